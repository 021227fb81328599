//! The protobuf codec of every generated client and server: tonic-prost's encoder and decoder with small buffers.
//!
//! tonic's default gives every stream an 8 KiB encode buffer and an 8 KiB decode buffer, allocated when the stream
//! opens and kept while it lives. An agent session is open for days and carries a few messages of a few hundred
//! bytes a minute, so at 19k sessions that default alone was ~300 MiB of hub memory. The buffers still grow to the
//! message at hand (the decoder reserves a message's announced length, the encoder grows to fit), so a 256 KiB
//! image chunk costs the same as before; only the idle floor shrinks.

use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial encode and decode buffer per stream, bytes: a heartbeat or a command fits; a report may grow it once.
pub const STREAM_BUFFER_BYTES: usize = 1024;
/// Encoded bytes after which a streaming response yields to the transport (tonic's default).
pub const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

/// A `tonic_prost::ProstCodec` with [`STREAM_BUFFER_BYTES`] buffers (named by `build.rs` as the codec of every
/// generated method).
#[derive(Debug, Clone, Copy)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(STREAM_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
