//! The wire: how strata nodes talk over QUIC.
//!
//! Every message is an rkyv archive in a length-prefixed, versioned frame ([`frame`]) on a
//! quinn stream of a connection secured by [`crate::tls`]. The messages ([`message`]) are
//! grouped into one enum per conversation, so that a stream reader matches one enum:
//! [`PeerMsg`] between coordinators, [`WorkerMsg`]/[`CoordinatorToWorker`] between workers and
//! coordinators, [`ClientMsg`]/[`CoordinatorToClient`] between clients and coordinators.
//!
//! A connection starts with the handshake ([`handshake`]): the dialling node opens a stream and
//! sends [`Hello`] ([`send_hello`]); the coordinator checks it against the certificate or the
//! bearer token ([`receive_hello`]) and answers [`Welcome`] or [`Refused`]. After that, each
//! request opens its own bidirectional stream ([`rpc`]): one request frame, the stream
//! finished, then one reply frame ([`request`]) or several ([`send_request`] +
//! [`read_frame_or_eof`]).
//!
//! ```no_run
//! # async fn example(conn: quinn::Connection) -> Result<(), strata_shared::wire::WireError> {
//! use strata_shared::wire::{self, ClientMsg, CoordinatorToClient, StatusRequest};
//! // Client side.
//! let reply: CoordinatorToClient =
//!     wire::request(&conn, &ClientMsg::Status(StatusRequest {})).await?;
//! // Server side: one task per stream.
//! while let Some((mut send, mut recv)) = wire::accept_stream(&conn).await? {
//!     tokio::spawn(async move {
//!         let request: ClientMsg = wire::read_frame(&mut recv).await?;
//!         // ... handle it, then answer:
//!         # let answer = CoordinatorToClient::NoQuorum;
//!         wire::write_frame(&mut send, &answer).await?;
//!         send.finish()?;
//!         Ok::<_, wire::WireError>(())
//!     });
//! }
//! # Ok(()) }
//! ```

pub mod frame;
pub mod handshake;
pub mod message;
pub mod rpc;

#[cfg(test)]
mod tests;

use std::io;

pub use frame::{
    MAX_FRAME_LEN, WIRE_VERSION, WireMessage, read_frame, read_frame_or_eof, write_frame,
};
pub use handshake::{
    AuthMethod, CLOSE_PROTOCOL_ERROR, CLOSE_REFUSED, Greeting, HELLO_TIMEOUT, receive_hello,
    send_hello,
};
pub use message::*;
pub use rpc::{accept_stream, request, send_request};

/// What can go wrong on the wire.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(
        "wire protocol version mismatch: the peer sent version {theirs}, this node speaks version {ours}"
    )]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge { len: u64, max: usize },
    #[error("frame length {len} is too short for the 2-byte version field")]
    FrameTooShort { len: usize },
    #[error("frame {part} truncated: expected {expected} bytes, the stream ended after {received}")]
    Truncated {
        part: &'static str,
        expected: usize,
        received: usize,
    },
    #[error("the stream ended before a frame")]
    Closed,
    #[error("invalid {type_name} archive: {source}")]
    Decode {
        type_name: &'static str,
        source: rkyv::rancor::Error,
    },
    #[error("cannot archive {type_name}: {source}")]
    Encode {
        type_name: &'static str,
        source: rkyv::rancor::Error,
    },
    #[error("refused by the peer: {0}")]
    Refused(String),
    #[error("peer not authenticated: {0}")]
    Unauthenticated(String),
    #[error("unexpected {got} (expected {expected})")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("the peer reset the stream (code {0})")]
    StreamReset(u64),
    #[error("the peer stopped reading the stream (code {0})")]
    StreamStopped(u64),
    #[error("connection lost: {0}")]
    Connection(quinn::ConnectionError),
    #[error("stream i/o: {0}")]
    Io(io::Error),
}

impl From<quinn::ConnectionError> for WireError {
    /// A connection the peer closed with [`CLOSE_REFUSED`] is [`WireError::Refused`] with the
    /// close reason; anything else is [`WireError::Connection`].
    fn from(error: quinn::ConnectionError) -> Self {
        match &error {
            quinn::ConnectionError::ApplicationClosed(close)
                if close.error_code == CLOSE_REFUSED =>
            {
                WireError::Refused(String::from_utf8_lossy(&close.reason).into_owned())
            }
            _ => WireError::Connection(error),
        }
    }
}

impl From<quinn::ReadError> for WireError {
    fn from(error: quinn::ReadError) -> Self {
        match error {
            quinn::ReadError::ConnectionLost(e) => e.into(),
            quinn::ReadError::Reset(code) => WireError::StreamReset(code.into_inner()),
            other => WireError::Io(io::Error::other(other)),
        }
    }
}

impl From<quinn::WriteError> for WireError {
    fn from(error: quinn::WriteError) -> Self {
        match error {
            quinn::WriteError::ConnectionLost(e) => e.into(),
            quinn::WriteError::Stopped(code) => WireError::StreamStopped(code.into_inner()),
            other => WireError::Io(io::Error::other(other)),
        }
    }
}

impl From<quinn::ClosedStream> for WireError {
    fn from(error: quinn::ClosedStream) -> Self {
        WireError::Io(io::Error::other(error))
    }
}

impl WireError {
    /// Converts an I/O error of a stream, recovering the quinn error inside it (quinn streams
    /// report through `std::io::Error` in their tokio traits) so that a lost connection or a
    /// refusal says so.
    pub fn from_io(error: io::Error) -> WireError {
        if error.get_ref().is_none() {
            return WireError::Io(error);
        }
        let kind = error.kind();
        let Some(inner) = error.into_inner() else {
            return WireError::Io(io::Error::from(kind));
        };
        let inner = match inner.downcast::<quinn::ReadError>() {
            Ok(read) => return (*read).into(),
            Err(inner) => inner,
        };
        match inner.downcast::<quinn::WriteError>() {
            Ok(write) => (*write).into(),
            Err(inner) => WireError::Io(io::Error::new(kind, inner)),
        }
    }

    /// Whether the connection is gone (as opposed to one stream or one frame being bad).
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, WireError::Connection(_) | WireError::Refused(_))
    }
}
