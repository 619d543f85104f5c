//! Requests: one bidirectional stream per request.
//!
//! The requester opens a stream, writes one request frame and finishes its half; the responder
//! answers with one frame ([`request`]) or a sequence of frames ending with the stream
//! ([`send_request`], then [`super::read_frame_or_eof`] until `None`). Streams are cheap in
//! QUIC and independent: a slow answer never holds up another request on the same connection.
//! Deadlines are the caller's (`tokio::time::timeout` around the call).

use super::{WireError, WireMessage, read_frame, write_frame};

/// Sends `req` on a new stream and reads the single reply frame.
pub async fn request<Resp: WireMessage>(
    conn: &quinn::Connection,
    req: &impl WireMessage,
) -> Result<Resp, WireError> {
    let mut recv = send_request(conn, req).await?;
    read_frame(&mut recv).await
}

/// Sends `req` on a new stream, finishes the sending half and returns the receiving half, for
/// requests answered by several frames (watching a build).
pub async fn send_request(
    conn: &quinn::Connection,
    req: &impl WireMessage,
) -> Result<quinn::RecvStream, WireError> {
    let (mut send, recv) = conn.open_bi().await?;
    write_frame(&mut send, req).await?;
    send.finish()?;
    Ok(recv)
}

/// The next stream the peer opens, or `None` once the connection is closed normally (by either
/// side, with any application close code except [`super::CLOSE_REFUSED`]). Serve each stream
/// in its own task: read the request with [`super::read_frame`], answer with
/// [`super::write_frame`] and `finish()`.
pub async fn accept_stream(
    conn: &quinn::Connection,
) -> Result<Option<(quinn::SendStream, quinn::RecvStream)>, WireError> {
    match conn.accept_bi().await {
        Ok(streams) => Ok(Some(streams)),
        Err(quinn::ConnectionError::LocallyClosed) => Ok(None),
        Err(quinn::ConnectionError::ApplicationClosed(close))
            if close.error_code != super::CLOSE_REFUSED =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}
