//! Frames: how one message travels on a byte stream.
//!
//! ```text
//! +----------------+-----------------+---------------------------+
//! | length: u32 BE | version: u16 BE | rkyv archive (length - 2) |
//! +----------------+-----------------+---------------------------+
//! ```
//!
//! `length` counts everything after itself (the version and the archive) and is at most
//! [`MAX_FRAME_LEN`]; `version` is [`WIRE_VERSION`]. A reader checks the version, then the
//! length (before allocating anything), reads the archive into an aligned buffer, validates it
//! with bytecheck (received bytes are never trusted) and deserializes an owned value. Any
//! defect is a [`WireError`], never a panic.
//!
//! The codec works on any tokio `AsyncRead`/`AsyncWrite`: quinn streams in the product,
//! in-memory pipes in tests. Several frames may follow each other on one stream.

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::WireError;

/// The wire protocol version this build speaks, carried by every frame. Bump it whenever a
/// message's archived layout changes.
pub const WIRE_VERSION: u16 = 3;

/// The largest frame accepted or sent, in bytes after the length field (64 MiB). Anything
/// bigger (Raft snapshots, layers) is sent in chunks or through the blob store.
pub const MAX_FRAME_LEN: usize = 64 * 1024 * 1024;

/// Bytes of the length and version fields.
const HEADER_LEN: usize = 6;
/// Bytes of the version field, counted in the length.
const VERSION_LEN: usize = 2;
/// Reading grows the buffer at most this much ahead of the bytes actually received, so a peer
/// that announces a large frame and sends nothing does not make us allocate it.
const READ_CHUNK: usize = 64 * 1024;

/// A type that can travel in a frame: any rkyv `Archive + Serialize + Deserialize` type whose
/// archive derives `CheckBytes` (the derive does so with rkyv's `bytecheck` feature).
/// Implemented for every such type; there is nothing to implement by hand.
pub trait WireMessage: Sized {
    /// The rkyv archive of the value.
    fn to_archive(&self) -> Result<AlignedVec, WireError>;
    /// Validates `bytes` as an archive of `Self` and deserializes it.
    fn from_archive(bytes: &[u8]) -> Result<Self, WireError>;
}

impl<T> WireMessage for T
where
    T: Archive + for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>,
    T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
        + Deserialize<T, HighDeserializer<rancor::Error>>,
{
    fn to_archive(&self) -> Result<AlignedVec, WireError> {
        rkyv::to_bytes::<rancor::Error>(self).map_err(|source| WireError::Encode {
            type_name: std::any::type_name::<T>(),
            source,
        })
    }

    fn from_archive(bytes: &[u8]) -> Result<Self, WireError> {
        let decode = |bytes: &[u8]| {
            rkyv::from_bytes::<T, rancor::Error>(bytes).map_err(|source| WireError::Decode {
                type_name: std::any::type_name::<T>(),
                source,
            })
        };
        // rkyv needs the archive aligned; copy it when the caller's buffer is not.
        if bytes.as_ptr().align_offset(16) == 0 {
            decode(bytes)
        } else {
            let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
            aligned.extend_from_slice(bytes);
            decode(&aligned)
        }
    }
}

/// Writes `msg` as one frame. Does not finish the stream: more frames may follow.
pub async fn write_frame<T: WireMessage>(
    writer: &mut (impl AsyncWrite + Unpin + ?Sized),
    msg: &T,
) -> Result<(), WireError> {
    let archive = msg.to_archive()?;
    let len = archive.len() + VERSION_LEN;
    if len > MAX_FRAME_LEN {
        return Err(WireError::FrameTooLarge {
            len: len as u64,
            max: MAX_FRAME_LEN,
        });
    }
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&(len as u32).to_be_bytes());
    header[4..].copy_from_slice(&WIRE_VERSION.to_be_bytes());
    writer
        .write_all(&header)
        .await
        .map_err(WireError::from_io)?;
    writer
        .write_all(&archive)
        .await
        .map_err(WireError::from_io)?;
    writer.flush().await.map_err(WireError::from_io)
}

/// Reads one frame and decodes it as `T`. The end of the stream before the frame is
/// [`WireError::Closed`]; use [`read_frame_or_eof`] where the stream may legitimately end.
pub async fn read_frame<T: WireMessage>(
    reader: &mut (impl AsyncRead + Unpin + ?Sized),
) -> Result<T, WireError> {
    read_frame_or_eof(reader).await?.ok_or(WireError::Closed)
}

/// Reads one frame and decodes it as `T`, or `None` when the stream ends cleanly where a frame
/// would start. A stream that ends inside a frame is [`WireError::Truncated`].
pub async fn read_frame_or_eof<T: WireMessage>(
    reader: &mut (impl AsyncRead + Unpin + ?Sized),
) -> Result<Option<T>, WireError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_up_to(reader, &mut header).await?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(WireError::Truncated {
            part: "header",
            expected: HEADER_LEN,
            received: got,
        });
    }
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    let version = u16::from_be_bytes([header[4], header[5]]);
    if version != WIRE_VERSION {
        return Err(WireError::VersionMismatch {
            ours: WIRE_VERSION,
            theirs: version,
        });
    }
    let len = len as usize;
    if len > MAX_FRAME_LEN {
        return Err(WireError::FrameTooLarge {
            len: len as u64,
            max: MAX_FRAME_LEN,
        });
    }
    if len < VERSION_LEN {
        return Err(WireError::FrameTooShort { len });
    }
    let body_len = len - VERSION_LEN;
    let mut body = AlignedVec::<16>::with_capacity(body_len.min(READ_CHUNK));
    let mut chunk = vec![0u8; body_len.min(READ_CHUNK)];
    while body.len() < body_len {
        let want = (body_len - body.len()).min(chunk.len());
        let n = reader
            .read(&mut chunk[..want])
            .await
            .map_err(WireError::from_io)?;
        if n == 0 {
            return Err(WireError::Truncated {
                part: "body",
                expected: body_len,
                received: body.len(),
            });
        }
        body.extend_from_slice(&chunk[..n]);
    }
    T::from_archive(&body).map(Some)
}

/// Reads until `buf` is full or the stream ends; returns how many bytes were read.
async fn read_up_to<R>(reader: &mut R, buf: &mut [u8]) -> Result<usize, WireError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader
            .read(&mut buf[filled..])
            .await
            .map_err(WireError::from_io)?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::Role;
    use crate::wire::message::*;

    fn sample() -> WorkerMsg {
        WorkerMsg::Register(RegisterWorker {
            name: "w1".into(),
            native: vec!["linux/amd64".into()],
            emulated: vec!["linux/arm64".into()],
            capacity: 4,
            labels: vec![("zone".into(), "eu-1".into())],
        })
    }

    fn frame_bytes<T: WireMessage>(msg: &T) -> Vec<u8> {
        let archive = msg.to_archive().unwrap();
        let mut bytes = ((archive.len() + 2) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&WIRE_VERSION.to_be_bytes());
        bytes.extend_from_slice(&archive);
        bytes
    }

    async fn read_from<T: WireMessage>(bytes: &[u8]) -> Result<Option<T>, WireError> {
        let mut reader = bytes;
        read_frame_or_eof::<T>(&mut reader).await
    }

    #[tokio::test]
    async fn frames_round_trip_through_a_pipe() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let msgs = vec![
            sample(),
            WorkerMsg::Heartbeat(Heartbeat {
                worker: "w1".into(),
                running: vec![1, 2, u64::MAX],
            }),
            WorkerMsg::Progress(JobProgress {
                job_id: 7,
                // Bigger than the pipe and than one read chunk.
                event: crate::progress::Event::Output {
                    job: 7,
                    n: 1,
                    data: "x".repeat(200_000),
                },
            }),
        ];
        let sent = msgs.clone();
        let writer = tokio::spawn(async move {
            for msg in &sent {
                write_frame(&mut a, msg).await.unwrap();
            }
        });
        for msg in &msgs {
            let got: WorkerMsg = read_frame(&mut b).await.unwrap();
            assert_eq!(&got, msg);
        }
        writer.await.unwrap();
        // The writer is gone: a clean end of stream at a frame boundary.
        assert!(
            read_frame_or_eof::<WorkerMsg>(&mut b)
                .await
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            read_frame::<WorkerMsg>(&mut b).await,
            Err(WireError::Closed)
        ));
    }

    #[tokio::test]
    async fn header_layout_is_length_then_version() {
        let hello = Hello {
            role: Role::Client,
            name: "ci".into(),
            token: None,
        };
        let mut out = Vec::new();
        write_frame(&mut out, &hello).await.unwrap();
        let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(len, out.len() - 4);
        assert_eq!(u16::from_be_bytes([out[4], out[5]]), WIRE_VERSION);
        assert_eq!(read_from::<Hello>(&out).await.unwrap(), Some(hello));
    }

    #[tokio::test]
    async fn wrong_version_names_both_versions() {
        let mut bytes = frame_bytes(&sample());
        bytes[4..6].copy_from_slice(&7u16.to_be_bytes());
        let err = read_from::<WorkerMsg>(&bytes).await.unwrap_err();
        assert!(
            matches!(
                err,
                WireError::VersionMismatch {
                    ours: WIRE_VERSION,
                    theirs: 7
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains('7') && text.contains(&WIRE_VERSION.to_string()),
            "{text}"
        );
    }

    #[tokio::test]
    async fn oversize_length_is_refused_before_reading() {
        let mut bytes = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&WIRE_VERSION.to_be_bytes());
        let err = read_from::<WorkerMsg>(&bytes).await.unwrap_err();
        assert!(matches!(err, WireError::FrameTooLarge { .. }), "{err:?}");
        assert!(err.to_string().contains("maximum"), "{err}");

        let mut bytes = u32::MAX.to_be_bytes().to_vec();
        bytes.extend_from_slice(&WIRE_VERSION.to_be_bytes());
        let err = read_from::<WorkerMsg>(&bytes).await.unwrap_err();
        assert!(matches!(err, WireError::FrameTooLarge { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn oversize_message_is_refused_on_write() {
        let msg = JobProgress {
            job_id: 1,
            event: crate::progress::Event::Note {
                text: "x".repeat(MAX_FRAME_LEN),
            },
        };
        let mut out = Vec::new();
        let err = write_frame(&mut out, &msg).await.unwrap_err();
        assert!(matches!(err, WireError::FrameTooLarge { .. }), "{err:?}");
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn too_short_length_is_an_error() {
        for len in [0u32, 1] {
            let mut bytes = len.to_be_bytes().to_vec();
            bytes.extend_from_slice(&WIRE_VERSION.to_be_bytes());
            let err = read_from::<WorkerMsg>(&bytes).await.unwrap_err();
            assert!(matches!(err, WireError::FrameTooShort { .. }), "{err:?}");
        }
    }

    #[tokio::test]
    async fn every_truncation_is_an_error() {
        let bytes = frame_bytes(&sample());
        for cut in 1..bytes.len() {
            let err = read_from::<WorkerMsg>(&bytes[..cut]).await.unwrap_err();
            assert!(
                matches!(err, WireError::Truncated { .. }),
                "cut {cut}: {err:?}"
            );
        }
        let err = read_from::<WorkerMsg>(&bytes[..10]).await.unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[tokio::test]
    async fn random_garbage_is_an_error_never_a_panic() {
        let valid = frame_bytes(&sample());
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..3000 {
            let bytes: Vec<u8> = if round % 2 == 0 {
                // Pure noise of random length.
                let len = (next() % 300) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                // A valid frame with a few body bytes flipped: header passes, bytecheck must
                // catch the rest.
                let mut bytes = valid.clone();
                for _ in 0..1 + next() % 4 {
                    let at = HEADER_LEN + (next() as usize) % (bytes.len() - HEADER_LEN);
                    bytes[at] ^= (next() as u8) | 1;
                }
                bytes
            };
            // Ok(..) is possible when the flips land in padding or still form a valid value;
            // what matters is that nothing panics.
            let _ = read_from::<WorkerMsg>(&bytes).await;
            let _ = read_from::<CoordinatorToClient>(&bytes).await;
        }
        // Noise behind a well-formed header reaches bytecheck and fails there.
        let noise: Vec<u8> = (0..64).map(|_| next() as u8 | 0x80).collect();
        let mut bytes = ((noise.len() + 2) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&WIRE_VERSION.to_be_bytes());
        bytes.extend_from_slice(&noise);
        let err = read_from::<WorkerMsg>(&bytes).await.unwrap_err();
        assert!(matches!(err, WireError::Decode { .. }), "{err:?}");
        assert!(err.to_string().contains("WorkerMsg"), "{err}");
    }

    #[tokio::test]
    async fn a_frame_of_another_type_fails_validation() {
        let bytes = frame_bytes(&Hello {
            role: Role::Worker,
            name: "w".into(),
            token: Some("t".into()),
        });
        // Whatever the outcome, no panic; an archive of a different shape is usually refused.
        let _ = read_from::<StatusReply>(&bytes).await;
    }

    #[test]
    fn unaligned_archives_decode() {
        let archive = sample().to_archive().unwrap();
        let mut shifted = vec![0u8; archive.len() + 1];
        shifted[1..].copy_from_slice(&archive);
        assert_eq!(WorkerMsg::from_archive(&shifted[1..]).unwrap(), sample());
    }
}
