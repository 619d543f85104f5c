//! The handshake: the first stream of every connection.
//!
//! The dialling node opens a stream and sends [`Hello`] (its role, its name and, for a client
//! without a certificate, a bearer token); the coordinator answers [`HelloReply::Welcome`] or
//! [`HelloReply::Refused`]. Who the peer is comes from the TLS handshake first: a node that
//! presented a certificate is the role and name in it, and its hello must agree. A node
//! without a certificate can only be a client, and only with a valid token
//! ([`ClientTokens`], compared in constant time). A refused node gets the reason in a
//! [`Refused`] frame, then the connection is closed with [`CLOSE_REFUSED`] and the same reason,
//! so that the reason arrives even if the frame does not.

use std::time::Duration;

use quinn::VarInt;

use super::{Hello, HelloReply, Refused, Welcome, WireError, read_frame, request, write_frame};
use crate::tls::{ClientTokens, PeerIdentity, Role, peer_identity};

/// How long either side waits for the other's handshake frame.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Application close code: the peer was refused (its reason is the close reason).
pub const CLOSE_REFUSED: VarInt = VarInt::from_u32(1);

/// Application close code: the peer broke the protocol (bad or missing frame).
pub const CLOSE_PROTOCOL_ERROR: VarInt = VarInt::from_u32(2);

/// How long a refusing coordinator waits for its [`Refused`] frame to be read before closing.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// How the peer proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A certificate of the cluster CA, verified in the TLS handshake.
    Certificate,
    /// A bearer token in its [`Hello`] (clients only); its name is as the client claims.
    Token,
}

/// The client side: sends `hello` on a new stream and returns the coordinator's [`Welcome`], or
/// [`WireError::Refused`] with the reason.
pub async fn send_hello(conn: &quinn::Connection, hello: &Hello) -> Result<Welcome, WireError> {
    let reply = tokio::time::timeout(HELLO_TIMEOUT, request::<HelloReply>(conn, hello))
        .await
        .map_err(|_| WireError::Timeout("the coordinator's answer to hello"))??;
    match reply {
        HelloReply::Welcome(welcome) => Ok(welcome),
        HelloReply::Refused(refused) => Err(WireError::Refused(refused.reason)),
    }
}

/// A hello that passed authentication, waiting for the coordinator's answer.
#[derive(Debug)]
pub struct Greeting {
    peer: PeerIdentity,
    auth: AuthMethod,
    hello: Hello,
    send: quinn::SendStream,
    conn: quinn::Connection,
}

/// The server side: reads the peer's [`Hello`] from the first stream it opens and
/// authenticates it against its certificate or `tokens`. On success the caller answers with
/// [`Greeting::welcome`] (or [`Greeting::refuse`], e.g. for a role this endpoint does not
/// serve). On failure the peer has been sent [`Refused`], the connection is closed, the refusal
/// is logged with the remote address, and the error is returned.
pub async fn receive_hello(
    conn: &quinn::Connection,
    tokens: &ClientTokens,
) -> Result<Greeting, WireError> {
    let remote = conn.remote_address();
    let protocol_error = |what: &str, error: WireError| {
        tracing::warn!(%remote, %error, "closing connection: {what}");
        conn.close(CLOSE_PROTOCOL_ERROR, error.to_string().as_bytes());
        error
    };
    let (send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(streams) => streams?,
        Err(_) => {
            return Err(protocol_error(
                "no hello",
                WireError::Timeout("the hello stream"),
            ));
        }
    };
    let mut hello: Hello = match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut recv)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(error)) if error.is_connection_lost() => return Err(error),
        Ok(Err(error)) => return Err(protocol_error("invalid hello", error)),
        Err(_) => {
            return Err(protocol_error(
                "no hello",
                WireError::Timeout("the hello frame"),
            ));
        }
    };
    match authenticate(peer_identity(conn), &hello, tokens) {
        Ok((peer, auth)) => {
            // The token has done its job; keep it out of the caller's hands and logs.
            hello.token = None;
            tracing::debug!(%remote, %peer, ?auth, "hello accepted");
            Ok(Greeting {
                peer,
                auth,
                hello,
                send,
                conn: conn.clone(),
            })
        }
        Err(reason) => {
            tracing::warn!(
                %remote,
                role = %hello.role,
                name = %hello.name,
                %reason,
                "refused connection: authentication failed"
            );
            refuse(conn, send, &reason).await;
            Err(WireError::Unauthenticated(reason))
        }
    }
}

/// Who the peer is, from its certificate (`cert`) or its token; the reason when it is nobody.
fn authenticate(
    cert: Option<PeerIdentity>,
    hello: &Hello,
    tokens: &ClientTokens,
) -> Result<(PeerIdentity, AuthMethod), String> {
    match cert {
        Some(cert) if cert.role == hello.role && cert.name == hello.name => {
            Ok((cert, AuthMethod::Certificate))
        }
        Some(cert) => Err(format!(
            "the certificate names {cert} but the hello claims {} {}",
            hello.role, hello.name
        )),
        None if hello.role != Role::Client => Err(format!(
            "a {} must present a certificate of the cluster CA",
            hello.role
        )),
        None => match &hello.token {
            None => Err("no client certificate and no token".to_string()),
            Some(token) if tokens.verify(token) => Ok((
                PeerIdentity {
                    role: Role::Client,
                    name: hello.name.clone(),
                },
                AuthMethod::Token,
            )),
            Some(_) => Err("invalid token".to_string()),
        },
    }
}

/// Sends [`Refused`], gives the peer a moment to read it, and closes the connection with
/// [`CLOSE_REFUSED`] and the reason.
async fn refuse(conn: &quinn::Connection, mut send: quinn::SendStream, reason: &str) {
    let reply = HelloReply::Refused(Refused {
        reason: reason.to_string(),
    });
    if write_frame(&mut send, &reply).await.is_ok() && send.finish().is_ok() {
        let _ = tokio::time::timeout(REFUSAL_LINGER, send.stopped()).await;
    }
    conn.close(CLOSE_REFUSED, close_reason(reason));
}

/// A close reason must fit in one packet: at most 512 bytes, cut at a character boundary.
fn close_reason(reason: &str) -> &[u8] {
    let mut end = reason.len().min(512);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason.as_bytes()[..end]
}

impl Greeting {
    /// Who the peer is: from its certificate, or a client named by its hello (token).
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// How the peer authenticated.
    pub fn auth(&self) -> AuthMethod {
        self.auth
    }

    /// The peer's hello, token removed.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Lets the peer in: sends `welcome` and returns who it is.
    pub async fn welcome(mut self, welcome: Welcome) -> Result<PeerIdentity, WireError> {
        write_frame(&mut self.send, &HelloReply::Welcome(welcome)).await?;
        self.send.finish()?;
        Ok(self.peer)
    }

    /// Refuses an authenticated peer (say, a worker on a clients-only endpoint): sends
    /// [`Refused`] with `reason` and closes the connection.
    pub async fn refuse(self, reason: &str) {
        tracing::warn!(
            remote = %self.conn.remote_address(),
            peer = %self.peer,
            %reason,
            "refused connection"
        );
        refuse(&self.conn, self.send, reason).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(role: Role, name: &str, token: Option<&str>) -> Hello {
        Hello {
            role,
            name: name.into(),
            token: token.map(str::to_string),
        }
    }

    fn peer(role: Role, name: &str) -> PeerIdentity {
        PeerIdentity {
            role,
            name: name.into(),
        }
    }

    #[test]
    fn certificate_decides_and_hello_must_agree() {
        let tokens = ClientTokens::new(["secret"]);
        let cert = Some(peer(Role::Worker, "w1"));
        assert_eq!(
            authenticate(cert.clone(), &hello(Role::Worker, "w1", None), &tokens),
            Ok((peer(Role::Worker, "w1"), AuthMethod::Certificate))
        );
        let err =
            authenticate(cert.clone(), &hello(Role::Coordinator, "w1", None), &tokens).unwrap_err();
        assert!(err.contains("worker w1"), "{err}");
        // A valid token does not let a certificate holder claim another identity.
        assert!(authenticate(cert, &hello(Role::Worker, "w2", Some("secret")), &tokens).is_err());
    }

    #[test]
    fn tokens_are_for_clients_only() {
        let tokens = ClientTokens::new(["secret"]);
        assert_eq!(
            authenticate(None, &hello(Role::Client, "ci", Some("secret")), &tokens),
            Ok((peer(Role::Client, "ci"), AuthMethod::Token))
        );
        for role in [Role::Worker, Role::Coordinator] {
            let err = authenticate(None, &hello(role, "x", Some("secret")), &tokens).unwrap_err();
            assert!(err.contains("certificate"), "{err}");
        }
        assert_eq!(
            authenticate(None, &hello(Role::Client, "ci", Some("nope")), &tokens).unwrap_err(),
            "invalid token"
        );
        assert!(authenticate(None, &hello(Role::Client, "ci", None), &tokens).is_err());
        assert!(
            authenticate(
                None,
                &hello(Role::Client, "ci", Some("")),
                &ClientTokens::none()
            )
            .is_err()
        );
    }

    #[test]
    fn close_reasons_are_cut_at_a_character_boundary() {
        let long = "é".repeat(400);
        let cut = close_reason(&long);
        assert!(cut.len() <= 512);
        assert!(std::str::from_utf8(cut).is_ok());
    }
}
