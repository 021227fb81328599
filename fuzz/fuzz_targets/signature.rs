//! minisign files: signatures, public and secret keys; a parsed signature is verified against a parsed key.
#![no_main]
use libfuzzer_sys::fuzz_target;
use upkeep_core::signature::{PublicKey, SecretKey, Signature, Signed};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = SecretKey::parse(text);
    let key = PublicKey::parse(text);
    if let Ok(sig) = Signature::parse(text) {
        let _ = sig.key_id_string();
        if let Ok(k) = key {
            let _ = sig.verify(std::slice::from_ref(&k), Signed::Message(data));
        }
    }
});
