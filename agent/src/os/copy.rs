//! Copying an image while hashing it, with the SHA-256 on its own thread, overlapped with the copy. Every
//! slot backend that copies an image (raw slots, the directory backend's unpack) goes through here, so that
//! the hash costs no wall time when a core is free for it: a 1 GiB image is written at the disk's speed rather
//! than at (disk time + hash time).
//!
//! ```text
//!  caller's thread: read buffer k ─▶ write (or unpack) buffer k ─▶ read buffer k+1 ─▶ ...
//!                          │ shared, read-only                        ▲
//!                          ▼                                          │ buffer k back once hashed
//!  hash thread:      hash buffer k ───────────────────────────────────┘
//! ```
//!
//! The caller's thread reads and writes, as `dd` does; the hash thread reads the same buffer at the same time
//! (while it is still in cache), so the hash adds a core's work but no copy. A fixed number of buffers
//! circulates (by default 8 of 512 KiB), so memory stays bounded whatever the image size and the slower side
//! holds the other back. Reads and writes fail on the caller's thread, where the error is returned at once; the
//! hash thread is told the end with an explicit `End`, so a copy that stops early is never hashed as a whole
//! image. This module decides nothing about slots: it returns the digest and the byte count, and its callers
//! compare them and say what the slot holds.

use ring::digest::{Context, SHA256};
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};

/// Lower-case hex, the form digests are written and compared in.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes in one buffer. Small enough to stay in a core's L2 cache between the read that fills it, the hash
/// and the write that read it: on the 2-core test machine, under load, even `dd` spent several times the
/// system time with 4 MiB blocks than with 512 KiB ones (BENCHMARKS.md).
pub const CHUNK_BYTES: usize = 512 * 1024;
/// Buffers in circulation at most: one copy holds `CHUNK_BYTES * CHUNKS_IN_FLIGHT` (4 MiB) of memory.
pub const CHUNKS_IN_FLIGHT: usize = 8;

/// The buffers a copy uses, and whether it also computes the signature prehash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffers {
    /// Bytes in each buffer (at least 1).
    pub chunk_bytes: usize,
    /// Buffers in circulation (at least 1).
    pub chunks: usize,
    /// Also compute the BLAKE2b-512 prehash a minisign signature covers, on a third thread after the SHA-256
    /// one (the privileged executor checks the signature on the bytes it writes).
    pub prehash: bool,
}

impl Buffers {
    /// What the agent uses: 8 buffers of 512 KiB, SHA-256 only.
    pub const DEFAULT: Buffers = Buffers { chunk_bytes: CHUNK_BYTES, chunks: CHUNKS_IN_FLIGHT, prehash: false };

    /// The same buffers, also computing the signature prehash.
    pub fn with_prehash(self) -> Buffers {
        Buffers { prehash: true, ..self }
    }
}

/// What a copy read, hashed and handed on (the three are the same bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// SHA-256 of every byte read, lower-case hex.
    pub sha256: String,
    /// Bytes read.
    pub bytes: u64,
    /// Their BLAKE2b-512 (the signature prehash), when the copy was asked for it (`Buffers::prehash`).
    pub prehash: Option<[u8; 64]>,
}

/// Why a copy failed. The caller knows the paths and names them.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Reading the source failed.
    #[error("reading the source failed")]
    Read(#[source] io::Error),
    /// The side that takes the bytes (writing a slot, unpacking an archive) failed.
    #[error("taking the bytes failed")]
    Write(#[source] io::Error),
    /// A thread of the copy panicked (a bug); nothing it did can be trusted.
    #[error("the {0} thread of the copy panicked")]
    Panicked(&'static str),
}

impl CopyError {
    /// The underlying I/O error, or one describing the panic.
    pub fn into_io(self) -> io::Error {
        match self {
            CopyError::Read(e) | CopyError::Write(e) => e,
            CopyError::Panicked(_) => io::Error::other(self.to_string()),
        }
    }
}

/// One message to the hash thread: a shared buffer with its first `len` bytes filled, or the end of the source.
enum Msg {
    Data(Arc<Vec<u8>>, usize),
    End,
}

/// Copies `reader` to `writer` while hashing on another thread; returns the digest and the byte count.
/// `writer` is not flushed or synced (its owner knows whether it must be).
pub fn copy_and_hash<R: Read>(reader: R, writer: &mut impl Write) -> Result<Copied, CopyError> {
    copy_and_hash_with(reader, writer, Buffers::DEFAULT)
}

/// `copy_and_hash` with the given buffers.
pub fn copy_and_hash_with<R: Read>(reader: R, writer: &mut impl Write, buffers: Buffers) -> Result<Copied, CopyError> {
    let (copied, ()) = pipeline(reader, buffers, |chunks| {
        while let Some(data) = chunks.next_chunk().map_err(CopyError::Read)? {
            writer.write_all(data).map_err(CopyError::Write)?;
        }
        Ok(())
    })?;
    Ok(copied)
}

/// Hands `reader` to `consume` as a stream (for instance a tar unpacker) while hashing it on another thread.
/// Whatever `consume` leaves unread (an archive's trailing padding) is read and hashed too, so the digest
/// always covers the whole source. An error of `consume` comes back as `CopyError::Write`.
pub fn consume_and_hash<R: Read, T>(
    reader: R,
    buffers: Buffers,
    consume: impl FnOnce(&mut dyn Read) -> io::Result<T>,
) -> Result<(Copied, T), CopyError> {
    pipeline(reader, buffers, |chunks| consume(chunks).map_err(CopyError::Write))
}

/// Runs the hash on its own thread and the reading and `consume` on this one, then joins the hash and picks
/// the error to report: a read error first (a consumer that saw the stream break is only its echo), then a
/// panic of the hash thread, then the consumer's own.
fn pipeline<R: Read, T>(
    reader: R,
    buffers: Buffers,
    consume: impl FnOnce(&mut Chunks<R>) -> Result<T, CopyError>,
) -> Result<(Copied, T), CopyError> {
    let chunks = buffers.chunks.max(1);
    let (to_hash, hash_in) = sync_channel::<Msg>(chunks);
    let (back, returned) = sync_channel::<Arc<Vec<u8>>>(chunks);
    std::thread::scope(|s| {
        // SHA-256, then (when asked) the prehash on a thread of its own: each buffer goes from one to the next,
        // and the last hands it back.
        let (hash, pre) = if buffers.prehash {
            let (to_pre, pre_in) = sync_channel::<Msg>(chunks);
            let pre = s.spawn(move || prehash_stage(&pre_in, &back));
            (s.spawn(move || hash_stage(&hash_in, &Next::Stage(to_pre))), Some(pre))
        } else {
            (s.spawn(move || hash_stage(&hash_in, &Next::Back(back))), None)
        };
        let mut source = Chunks {
            reader,
            chunk_bytes: buffers.chunk_bytes.max(1),
            chunks,
            allocated: 0,
            to_hash,
            returned,
            current: None,
            ended: false,
            failure: None,
        };
        // The consumer may stop before the end (an archive's padding): the rest is still read and hashed.
        let consumed = consume(&mut source).and_then(|t| source.drain().map(|()| t));
        let failure = source.failure.take();
        // Hanging up tells the hash thread the copy stopped, if it did not reach `End`.
        drop(source);
        let hashed = hash.join().map_err(|_| CopyError::Panicked("hashing"))?;
        let prehashed = match pre {
            Some(p) => Some(p.join().map_err(|_| CopyError::Panicked("prehashing"))?),
            None => None,
        };
        if let Some(e) = failure {
            return Err(e);
        }
        let t = consumed?;
        // The source reached `End`, which the hash threads answer with the digests of every byte before it.
        let mut copied = hashed.ok_or(CopyError::Panicked("hashing"))?;
        if let Some(p) = prehashed {
            copied.prehash = Some(p.ok_or(CopyError::Panicked("prehashing"))?);
        }
        Ok((copied, t))
    })
}

/// Reads until `buf` is full or the source ends (short reads would make short writes); returns bytes read.
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Where a hash stage sends a buffer it is done with.
enum Next {
    /// Back to the reader.
    Back(SyncSender<Arc<Vec<u8>>>),
    /// On to the next stage (which hands it back).
    Stage(SyncSender<Msg>),
}

/// Hashes every buffer and passes it on; `Some` once it saw `End`, `None` if the copy stopped before.
fn hash_stage(input: &Receiver<Msg>, next: &Next) -> Option<Copied> {
    let mut ctx = Context::new(&SHA256);
    let mut bytes = 0u64;
    loop {
        match input.recv().ok()? {
            Msg::Data(buf, n) => {
                ctx.update(&buf[..n]);
                bytes += n as u64;
                // The copy may have stopped already; then nobody needs the buffer back.
                let _ = match next {
                    Next::Back(back) => back.send(buf).is_ok(),
                    Next::Stage(stage) => stage.send(Msg::Data(buf, n)).is_ok(),
                };
            }
            Msg::End => {
                if let Next::Stage(stage) = next {
                    let _ = stage.send(Msg::End);
                }
                return Some(Copied { sha256: hex(ctx.finish().as_ref()), bytes, prehash: None });
            }
        }
    }
}

/// The prehash stage: BLAKE2b-512 of every buffer, each handed back after; `Some` once it saw `End`.
fn prehash_stage(input: &Receiver<Msg>, back: &SyncSender<Arc<Vec<u8>>>) -> Option<[u8; 64]> {
    let mut pre = upkeep_core::signature::Prehasher::new();
    loop {
        match input.recv().ok()? {
            Msg::Data(buf, n) => {
                pre.update(&buf[..n]);
                let _ = back.send(buf);
            }
            Msg::End => return Some(pre.finish()),
        }
    }
}

/// The source as the consumer sees it: whole buffers (`next_chunk`) or a byte stream (`Read`). Each buffer
/// read is shared with the hash thread before the consumer gets it.
struct Chunks<R> {
    reader: R,
    chunk_bytes: usize,
    chunks: usize,
    allocated: usize,
    to_hash: SyncSender<Msg>,
    returned: Receiver<Arc<Vec<u8>>>,
    /// The buffer being consumed, its filled length, and how much of it was consumed.
    current: Option<(Arc<Vec<u8>>, usize, usize)>,
    ended: bool,
    /// The first failure of the source, kept for `pipeline` (the consumer only sees an io::Error like it).
    failure: Option<CopyError>,
}

impl<R: Read> Chunks<R> {
    /// The next buffer's bytes, `None` at the end of the source.
    fn next_chunk(&mut self) -> io::Result<Option<&[u8]>> {
        if let Some(e) = &self.failure {
            return Err(echo(e));
        }
        match self.advance() {
            Ok(more) => Ok(if more { self.current.as_ref().map(|(b, n, _)| &b[..*n]) } else { None }),
            Err(e) => {
                let echoed = echo(&e);
                self.failure = Some(e);
                Err(echoed)
            }
        }
    }

    /// Reads the next buffer and shares it with the hash thread; `false` at the end (after telling it so).
    fn advance(&mut self) -> Result<bool, CopyError> {
        // Ours is dropped here; the hash thread's copy comes back once hashed.
        self.current = None;
        if self.ended {
            return Ok(false);
        }
        let mut buf = self.free_buffer()?;
        let n = fill(&mut self.reader, &mut buf).map_err(CopyError::Read)?;
        if n == 0 {
            self.to_hash.send(Msg::End).map_err(|_| CopyError::Panicked("hashing"))?;
            self.ended = true;
            return Ok(false);
        }
        let buf = Arc::new(buf);
        self.to_hash.send(Msg::Data(Arc::clone(&buf), n)).map_err(|_| CopyError::Panicked("hashing"))?;
        self.current = Some((buf, n, 0));
        Ok(true)
    }

    /// A buffer to read into: one the hash thread is done with, a new one while fewer than `chunks` exist, or
    /// else the next one it hands back.
    fn free_buffer(&mut self) -> Result<Vec<u8>, CopyError> {
        let shared = match self.returned.try_recv() {
            Ok(b) => b,
            Err(TryRecvError::Empty) if self.allocated < self.chunks => {
                self.allocated += 1;
                return Ok(vec![0u8; self.chunk_bytes]);
            }
            Err(_) => self.returned.recv().map_err(|_| CopyError::Panicked("hashing"))?,
        };
        // Our own copy was dropped before the buffer after it was read, so this one is the last.
        Ok(Arc::try_unwrap(shared).unwrap_or_else(|still_shared| vec![0u8; still_shared.len()]))
    }

    /// Reads (and hashes) to the end, discarding.
    fn drain(&mut self) -> Result<(), CopyError> {
        while self.advance()? {}
        Ok(())
    }
}

/// An io::Error standing for `e`, for a consumer that can only see io::Errors (`pipeline` returns `e` itself).
fn echo(e: &CopyError) -> io::Error {
    match e {
        CopyError::Read(io) | CopyError::Write(io) => io::Error::new(io.kind(), io.to_string()),
        CopyError::Panicked(_) => io::Error::other(e.to_string()),
    }
}

impl<R: Read> Read for Chunks<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            if let Some((buf, n, used)) = &mut self.current
                && *used < *n
            {
                let k = (*n - *used).min(out.len());
                out[..k].copy_from_slice(&buf[*used..*used + k]);
                *used += k;
                return Ok(k);
            }
            if self.next_chunk()?.is_none() {
                return Ok(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        super::hex(ring::digest::digest(&SHA256, b).as_ref())
    }

    /// Bytes that differ from position to position (a shifted or dropped chunk changes the digest).
    fn data(len: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_u32;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    /// Hands out at most `step` bytes per read, so buffers are filled from several reads.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let k = self.data.len().min(buf.len()).min(self.step);
            buf[..k].copy_from_slice(&self.data[..k]);
            self.data = &self.data[k..];
            Ok(k)
        }
    }

    /// Fails once `after` bytes were read.
    struct FailingReader {
        left: usize,
    }

    impl Read for FailingReader {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Err(io::Error::other("injected read failure"));
            }
            let k = self.left.min(buf.len());
            buf[..k].fill(1);
            self.left -= k;
            Ok(k)
        }
    }

    /// Accepts `room` bytes, then fails like a full disk.
    struct FullDisk {
        room: usize,
        got: Vec<u8>,
    }

    impl Write for FullDisk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::new(io::ErrorKind::StorageFull, "injected write failure"));
            }
            let k = self.room.min(buf.len());
            self.got.extend_from_slice(&buf[..k]);
            self.room -= k;
            Ok(k)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const SMALL: Buffers = Buffers { chunk_bytes: 1000, chunks: 3, prehash: false };

    #[test]
    fn copies_and_hashes_every_size_around_the_buffer_size() {
        let b = SMALL.chunk_bytes;
        for len in [0, 1, b - 1, b, b + 1, 2 * b, 7 * b + 13, 40 * b + 999] {
            let src = data(len);
            for step in [usize::MAX, 333] {
                let mut out = Vec::new();
                let c = copy_and_hash_with(Trickle { data: &src, step }, &mut out, SMALL).expect("copy");
                assert_eq!(c, Copied { sha256: sha(&src), bytes: len as u64, prehash: None }, "len {len} step {step}");
                assert!(out == src, "len {len} step {step}: the bytes written differ from the source");
            }
        }
    }

    #[test]
    fn copies_around_the_default_buffer_size() {
        for len in [CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 3 * CHUNK_BYTES + 7] {
            let src = data(len);
            let mut out = Vec::new();
            let c = copy_and_hash(&src[..], &mut out).expect("copy");
            assert_eq!((c.sha256, c.bytes), (sha(&src), len as u64), "len {len}");
            assert!(out == src, "len {len}");
        }
    }

    #[test]
    fn the_prehash_stage_covers_the_same_bytes_whatever_the_buffers() {
        for (buffers, len) in [(SMALL, 0), (SMALL, 40 * SMALL.chunk_bytes + 999), (Buffers::DEFAULT, CHUNK_BYTES + 1)] {
            for chunks in [1, buffers.chunks] {
                let src = data(len);
                let mut out = Vec::new();
                let b = Buffers { chunks, ..buffers }.with_prehash();
                let c = copy_and_hash_with(Trickle { data: &src, step: 333 }, &mut out, b).expect("copy");
                assert_eq!(c.sha256, sha(&src), "len {len} chunks {chunks}");
                assert_eq!(c.prehash, Some(upkeep_core::signature::blake2b_512(&src)), "len {len} chunks {chunks}");
                assert!(out == src, "len {len} chunks {chunks}");
            }
        }
    }

    #[test]
    fn one_buffer_in_circulation_still_copies() {
        let src = data(10 * 64 + 5);
        let mut out = Vec::new();
        let c = copy_and_hash_with(&src[..], &mut out, Buffers { chunk_bytes: 64, chunks: 1, prehash: false })
            .expect("copy");
        assert_eq!((c.sha256, out), (sha(&src), src));
    }

    #[test]
    fn a_read_failure_is_an_error_not_a_short_image() {
        for left in [0, 10, SMALL.chunk_bytes, 5 * SMALL.chunk_bytes + 1] {
            let mut out = Vec::new();
            let e = copy_and_hash_with(FailingReader { left }, &mut out, SMALL).expect_err("read fails");
            assert!(matches!(&e, CopyError::Read(io) if io.to_string() == "injected read failure"), "{left}: {e}");
            let e = consume_and_hash(FailingReader { left }, SMALL, |r| io::copy(r, &mut io::sink()))
                .expect_err("read fails");
            assert!(matches!(&e, CopyError::Read(io) if io.to_string() == "injected read failure"), "{left}: {e}");
        }
    }

    #[test]
    fn a_write_failure_is_an_error_and_stops_the_copy() {
        for room in [0, 1, SMALL.chunk_bytes, 4 * SMALL.chunk_bytes + 7] {
            let src = data(50 * SMALL.chunk_bytes);
            let mut disk = FullDisk { room, got: Vec::new() };
            let e = copy_and_hash_with(&src[..], &mut disk, SMALL).expect_err("write fails");
            assert!(matches!(&e, CopyError::Write(io) if io.kind() == io::ErrorKind::StorageFull), "{room}: {e}");
            assert_eq!(disk.got, src[..room], "what was written before the failure is a prefix");
        }
        // A consumer failing half-way through a stream.
        let src = data(10 * SMALL.chunk_bytes);
        let e = consume_and_hash(&src[..], SMALL, |r| {
            let mut half = vec![0u8; 3 * SMALL.chunk_bytes + 1];
            r.read_exact(&mut half)?;
            Err::<(), _>(io::Error::other("unpack failed"))
        })
        .expect_err("consumer fails");
        assert!(matches!(&e, CopyError::Write(io) if io.to_string() == "unpack failed"), "{e}");
    }

    #[test]
    fn what_a_consumer_leaves_unread_is_hashed_too() {
        let src = data(9 * SMALL.chunk_bytes + 17);
        let (c, first) = consume_and_hash(&src[..], SMALL, |r| {
            let mut head = [0u8; 10];
            r.read_exact(&mut head)?;
            Ok(head)
        })
        .expect("consume");
        assert_eq!((c.sha256, c.bytes, &first[..]), (sha(&src), src.len() as u64, &src[..10]));
        // A stream consumer that reads everything sees every byte in order.
        let (c, got) = consume_and_hash(Trickle { data: &src, step: 77 }, SMALL, |r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v)?;
            Ok(v)
        })
        .expect("consume");
        assert_eq!((c.sha256, got), (sha(&src), src));
    }
}
