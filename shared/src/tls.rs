//! The cluster's public-key infrastructure and the QUIC/TLS configuration built on it.
//!
//! Every strata connection is QUIC with TLS 1.3. One cluster certificate authority
//! ([`ClusterCa`], ECDSA P-256, made with rcgen) signs one [`Identity`] per node. An identity's
//! certificate carries the node's [`Role`] as the subject's organizational unit (`OU=worker`)
//! and its name as the common name (`CN=w1`); the name is also the certificate's DNS subject
//! alternative name, so a node is dialled by its name ([`connect`]), whatever its address.
//!
//! - [`server_config`] and [`client_config`] turn the CA certificate and an identity into quinn
//!   configurations: TLS 1.3 only, ALPN [`ALPN`], the aws-lc-rs crypto provider passed
//!   explicitly (nothing is installed process-wide, so parallel tests cannot race on it).
//!   A server that requires client authentication refuses, during the handshake, any client
//!   without a certificate of the cluster CA; one that does not still refuses a certificate of
//!   another CA, but lets certificate-less clients in so that they can authenticate with a
//!   bearer token ([`ClientTokens`], checked by [`crate::wire::receive_hello`]).
//! - [`accept`] completes an incoming connection and logs a refused handshake with
//!   `tracing::warn!` naming the remote address; [`peer_identity`] then reads the role and name
//!   from the certificate the peer presented.
//! - [`write_dev_pki`] writes a CA and one identity per node into a directory, for
//!   `strata coordinator init --out DIR`, development clusters and tests.
//!
//! Certificates are valid from 1975 to 4096 (rcgen's defaults): this PKI is for development
//! and tests. A production deployment brings its own CA and certificates, with the same role
//! and name conventions.

use std::collections::HashSet;
use std::fmt;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;

/// The ALPN protocol every strata endpoint speaks (the wire format's major version).
pub const ALPN: &[u8] = b"strata/1";

/// The organisation (`O=`) of every certificate this module issues.
const ORGANIZATION: &str = "strata";

/// Keep-alive interval of every strata connection: long-lived worker and peer connections
/// stay open while idle. Quinn's idle timeout (30 s by default) then only fires on a peer that
/// is really gone.
const KEEP_ALIVE: Duration = Duration::from_secs(1);
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// What a node is in the cluster; carried in its certificate (`OU=`) and in
/// [`crate::wire::Hello`].
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A coordinator: Raft peer, scheduler, API server. Its certificate is valid for both
    /// server and client authentication (coordinators dial each other).
    Coordinator,
    /// A build worker (client authentication only).
    Worker,
    /// A user or CI system submitting builds (client authentication only).
    Client,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 3] = [Role::Coordinator, Role::Worker, Role::Client];

    /// The lowercase name used in certificates and file names: `coordinator`, `worker`, `client`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
            Role::Client => "client",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| TlsError::UnknownRole(s.to_string()))
    }
}

/// Who is at the other end of a connection, as its verified certificate says.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    pub role: Role,
    pub name: String,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

/// Errors of certificate generation, loading and TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid node name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("unknown role {0:?} (expected coordinator, worker or client)")]
    UnknownRole(String),
    #[error("{what}: {reason}")]
    Pem { what: String, reason: String },
    #[error("{what}: not a strata certificate: {reason}")]
    Certificate { what: String, reason: String },
    #[error("{what}: the private key does not belong to the certificate")]
    KeyMismatch { what: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC crypto configuration: {0}")]
    Quic(#[from] NoInitialCipherSuite),
    #[error("cannot bind a QUIC endpoint to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot dial: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("handshake with {remote} failed: {source}")]
    Handshake {
        remote: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("the system random number generator failed")]
    Random,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The crypto provider of every strata TLS configuration, passed explicitly to each builder.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A node name must be usable as a DNS name (it is the server name dialled) and as part of a
/// file name: letters, digits, `-`, `_` and `.`, not an IP address.
fn validate_name(name: &str) -> Result<(), TlsError> {
    let invalid = |reason: &str| TlsError::InvalidName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(invalid(
            "only ASCII letters, digits, '-', '_' and '.' are allowed",
        ));
    }
    match ServerName::try_from(name) {
        Ok(ServerName::DnsName(_)) => Ok(()),
        Ok(_) => Err(invalid("an IP address is not a node name")),
        Err(_) => Err(invalid("not a valid DNS name")),
    }
}

fn san_for(value: &str) -> Result<SanType, TlsError> {
    match IpAddr::from_str(value) {
        Ok(ip) => Ok(SanType::IpAddress(ip)),
        Err(_) => Ok(SanType::DnsName(value.try_into()?)),
    }
}

/// The parameters of a cluster CA named `name`: a pure function of the name, so that a CA
/// loaded from PEM can sign again (the issuer name of its certificates must be byte-identical
/// to the CA certificate's subject).
fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// The certificate authority of one strata cluster.
pub struct ClusterCa {
    name: String,
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new self-signed CA (`O=strata, CN=<name>`, ECDSA P-256, path length 0).
    pub fn generate(name: &str) -> Result<ClusterCa, TlsError> {
        let params = ca_params(name);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(ClusterCa {
            name: name.to_string(),
            params,
            key,
            cert_pem,
        })
    }

    /// Loads a CA written by [`ClusterCa::to_pem`]. Fails when the key does not belong to the
    /// certificate or the certificate was not made by [`ClusterCa::generate`].
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, TlsError> {
        let what = "cluster CA certificate";
        let der = first_certificate(cert_pem, what)?;
        let parsed = der::parse_certificate(&der).map_err(|reason| TlsError::Certificate {
            what: what.to_string(),
            reason,
        })?;
        let name = parsed
            .attribute(der::OID_COMMON_NAME)
            .ok_or_else(|| TlsError::Certificate {
                what: what.to_string(),
                reason: "no common name".to_string(),
            })?
            .to_string();
        let key = KeyPair::from_pem(key_pem).map_err(|e| TlsError::Pem {
            what: "cluster CA key".to_string(),
            reason: e.to_string(),
        })?;
        let params = ca_params(&name);
        // Sign the same parameters again: the subject and public key must come out identical,
        // which proves that the key matches and that issued certificates will chain.
        let again = params.self_signed(&key)?;
        let again =
            der::parse_certificate(again.der()).map_err(|reason| TlsError::Certificate {
                what: what.to_string(),
                reason,
            })?;
        if again.spki != parsed.spki {
            return Err(TlsError::KeyMismatch {
                what: what.to_string(),
            });
        }
        if again.subject != parsed.subject {
            return Err(TlsError::Certificate {
                what: what.to_string(),
                reason: "its subject is not the one `ClusterCa::generate` writes".to_string(),
            });
        }
        Ok(ClusterCa {
            name,
            params,
            key,
            cert_pem: cert_pem.to_string(),
        })
    }

    /// The CA certificate and private key, PEM-encoded: `(cert_pem, key_pem)`. The certificate
    /// goes to every node; the key stays with whoever issues identities.
    pub fn to_pem(&self) -> (String, String) {
        (self.cert_pem.clone(), self.key.serialize_pem())
    }

    /// The CA certificate (PEM): the trust anchor every node is configured with.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's name (its certificate's common name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Issues a certificate for the node `name` in `role`: `O=strata, OU=<role>, CN=<name>`,
    /// subject alternative names `name` plus `sans` (IP addresses or DNS names), a fresh
    /// ECDSA P-256 key. Coordinators may authenticate as servers and clients, workers and
    /// clients as clients only.
    pub fn issue(&self, role: Role, name: &str, sans: &[String]) -> Result<Identity, TlsError> {
        validate_name(name)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, ORGANIZATION);
        dn.push(DnType::OrganizationalUnitName, role.as_str());
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let mut seen = HashSet::new();
        for san in std::iter::once(name).chain(sans.iter().map(String::as_str)) {
            if seen.insert(san) {
                params.subject_alt_names.push(san_for(san)?);
            }
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            Role::Coordinator => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Role::Worker | Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Identity {
            cert_chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A node's certificate chain and private key, PEM-encoded. The role and name are read from
/// the leaf certificate ([`Identity::peer`]).
#[derive(Clone)]
pub struct Identity {
    /// The node certificate first, then any intermediates (none for a [`ClusterCa`] identity).
    pub cert_chain_pem: String,
    /// The PKCS#8 private key.
    pub key_pem: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Identity");
        match self.peer() {
            Ok(peer) => s.field("role", &peer.role).field("name", &peer.name),
            Err(_) => s.field("cert_chain_pem", &self.cert_chain_pem),
        };
        s.field("key_pem", &"<redacted>").finish()
    }
}

/// Where [`Identity::save`] wrote an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    pub role: Role,
    pub name: String,
    /// `<dir>/<role>-<name>.crt`
    pub cert: PathBuf,
    /// `<dir>/<role>-<name>.key`, mode 0600
    pub key: PathBuf,
}

impl Identity {
    /// The role and name in the leaf certificate.
    pub fn peer(&self) -> Result<PeerIdentity, TlsError> {
        let what = "node certificate";
        let der = first_certificate(&self.cert_chain_pem, what)?;
        peer_from_der(&der).map_err(|reason| TlsError::Certificate {
            what: what.to_string(),
            reason,
        })
    }

    /// The file names of this identity without extension: `<role>-<name>`.
    pub fn file_stem(&self) -> Result<String, TlsError> {
        let peer = self.peer()?;
        Ok(file_stem(peer.role, &peer.name))
    }

    /// Writes `<dir>/<role>-<name>.crt` and `<dir>/<role>-<name>.key` (the key with mode 0600,
    /// never readable by others, not even while it is written). Creates `dir` if needed.
    pub fn save(&self, dir: &Path) -> Result<IdentityFiles, TlsError> {
        let peer = self.peer()?;
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let stem = file_stem(peer.role, &peer.name);
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        write_file(&cert, self.cert_chain_pem.as_bytes(), false)?;
        write_file(&key, self.key_pem.as_bytes(), true)?;
        Ok(IdentityFiles {
            role: peer.role,
            name: peer.name,
            cert,
            key,
        })
    }

    /// Reads an identity back from its certificate and key files, checking that the key
    /// belongs to the certificate. Warns when the key file is readable by group or others.
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        let cert_chain_pem = std::fs::read_to_string(cert).map_err(io_error(cert))?;
        let key_pem = std::fs::read_to_string(key).map_err(io_error(key))?;
        warn_if_key_readable(key);
        let identity = Identity {
            cert_chain_pem,
            key_pem,
        };
        identity.check(&format!("{} and {}", cert.display(), key.display()))?;
        Ok(identity)
    }

    /// Reads `<dir>/<role>-<name>.{crt,key}`, as written by [`Identity::save`].
    pub fn load_from_dir(dir: &Path, role: Role, name: &str) -> Result<Identity, TlsError> {
        let stem = file_stem(role, name);
        Identity::load(
            &dir.join(format!("{stem}.crt")),
            &dir.join(format!("{stem}.key")),
        )
    }

    /// Parses the chain and the key and checks that they belong together.
    fn check(&self, what: &str) -> Result<(), TlsError> {
        let der = first_certificate(&self.cert_chain_pem, what)?;
        let parsed = der::parse_certificate(&der).map_err(|reason| TlsError::Certificate {
            what: what.to_string(),
            reason,
        })?;
        let key = KeyPair::from_pem(&self.key_pem).map_err(|e| TlsError::Pem {
            what: what.to_string(),
            reason: format!("private key: {e}"),
        })?;
        use rcgen::PublicKeyData as _;
        if key.subject_public_key_info() != parsed.spki {
            return Err(TlsError::KeyMismatch {
                what: what.to_string(),
            });
        }
        peer_from_der(&der).map_err(|reason| TlsError::Certificate {
            what: what.to_string(),
            reason,
        })?;
        Ok(())
    }

    fn rustls_chain(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let chain = CertificateDer::pem_slice_iter(self.cert_chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem {
                what: "node certificate chain".to_string(),
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::Pem {
                what: "node certificate chain".to_string(),
                reason: "no CERTIFICATE block".to_string(),
            });
        }
        Ok(chain)
    }

    fn rustls_key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| TlsError::Pem {
            what: "node private key".to_string(),
            reason: e.to_string(),
        })
    }
}

fn file_stem(role: Role, name: &str) -> String {
    format!("{role}-{name}")
}

fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), TlsError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io_error(path))?;
    // The mode above only applies to a new file: tighten an existing one too.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io_error(path))?;
    }
    file.write_all(contents).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

fn warn_if_key_readable(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
                "private key file is readable by group or others; it should be mode 0600"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

fn first_certificate(pem: &str, what: &str) -> Result<CertificateDer<'static>, TlsError> {
    match CertificateDer::pem_slice_iter(pem.as_bytes()).next() {
        Some(Ok(der)) => Ok(der),
        Some(Err(e)) => Err(TlsError::Pem {
            what: what.to_string(),
            reason: e.to_string(),
        }),
        None => Err(TlsError::Pem {
            what: what.to_string(),
            reason: "no CERTIFICATE block".to_string(),
        }),
    }
}

fn peer_from_der(der: &[u8]) -> Result<PeerIdentity, String> {
    let parsed = der::parse_certificate(der)?;
    let role = parsed
        .attribute(der::OID_ORGANIZATIONAL_UNIT)
        .ok_or("no organizational unit (role)")?;
    let role = Role::from_str(role).map_err(|e| e.to_string())?;
    let name = parsed
        .attribute(der::OID_COMMON_NAME)
        .ok_or("no common name (node name)")?;
    Ok(PeerIdentity {
        role,
        name: name.to_string(),
    })
}

fn root_store(ca_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    let mut any = false;
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| TlsError::Pem {
            what: "cluster CA certificate".to_string(),
            reason: e.to_string(),
        })?;
        roots.add(cert)?;
        any = true;
    }
    if !any {
        return Err(TlsError::Pem {
            what: "cluster CA certificate".to_string(),
            reason: "no CERTIFICATE block".to_string(),
        });
    }
    Ok(Arc::new(roots))
}

/// Keep-alives every [`KEEP_ALIVE`] and a connection declared dead after [`IDLE_TIMEOUT`]
/// of silence: a coordinator notices a crashed peer within seconds and redials it.
fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    if let Ok(idle) = quinn::IdleTimeout::try_from(IDLE_TIMEOUT) {
        transport.max_idle_timeout(Some(idle));
    }
    Arc::new(transport)
}

/// The quinn server configuration of a coordinator: TLS 1.3, ALPN [`ALPN`], the node presents
/// `identity`. Client certificates are verified against `ca_pem` (the cluster CA); with
/// `require_client_auth` a client without one is refused in the handshake, without it such a
/// client gets in and must authenticate with a token in its first frame
/// ([`crate::wire::receive_hello`]). A certificate of another CA is refused either way.
pub fn server_config(
    ca_pem: &str,
    identity: &Identity,
    require_client_auth: bool,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(root_store(ca_pem)?, provider.clone());
    if !require_client_auth {
        verifier = verifier.allow_unauthenticated();
    }
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier.build()?)
        .with_single_cert(identity.rustls_chain()?, identity.rustls_key()?)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(transport_config());
    Ok(config)
}

/// The quinn client configuration of a node dialling a coordinator: the server must present a
/// certificate of the cluster CA (`ca_pem`) valid for the name dialled ([`connect`]); the
/// client presents `identity` when it has one (workers and coordinators must; clients may
/// use a token instead).
pub fn client_config(
    ca_pem: &str,
    identity: Option<&Identity>,
) -> Result<quinn::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root_store(ca_pem)?);
    let mut tls = match identity {
        Some(identity) => {
            builder.with_client_auth_cert(identity.rustls_chain()?, identity.rustls_key()?)?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(transport_config());
    Ok(config)
}

/// A server endpoint bound to `addr` (port 0 picks a free one: see `local_addr()`). It can
/// dial too once given a client configuration (`set_default_client_config`).
pub fn server_endpoint(
    addr: SocketAddr,
    config: quinn::ServerConfig,
) -> Result<quinn::Endpoint, TlsError> {
    quinn::Endpoint::server(config, addr).map_err(|source| TlsError::Bind { addr, source })
}

/// A client-only endpoint bound to `addr` (`127.0.0.1:0`, `0.0.0.0:0` or `[::]:0`) that dials
/// with `config`.
pub fn client_endpoint(
    addr: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<quinn::Endpoint, TlsError> {
    let mut endpoint =
        quinn::Endpoint::client(addr).map_err(|source| TlsError::Bind { addr, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Dials the node `server_name` (the name in its certificate, e.g. `coord-1`) at `addr` with
/// the endpoint's default client configuration and completes the handshake.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, TlsError> {
    endpoint
        .connect(addr, server_name)?
        .await
        .map_err(|source| TlsError::Handshake {
            remote: addr,
            source,
        })
}

/// Completes an incoming connection (`endpoint.accept().await`). A failed handshake, such as a
/// client certificate of another CA, is logged with `tracing::warn!` naming the remote
/// address, and returned.
pub async fn accept(incoming: quinn::Incoming) -> Result<quinn::Connection, TlsError> {
    let remote = incoming.remote_address();
    match incoming.await {
        Ok(conn) => {
            tracing::debug!(%remote, peer = ?peer_identity(&conn), "connection accepted");
            Ok(conn)
        }
        Err(source) => {
            tracing::warn!(%remote, error = %source, "refused connection: handshake failed");
            Err(TlsError::Handshake { remote, source })
        }
    }
}

/// The role and name in the certificate the peer presented and the handshake verified against
/// the cluster CA; `None` when the peer presented none (a token client) or it is not a strata
/// certificate.
pub fn peer_identity(conn: &quinn::Connection) -> Option<PeerIdentity> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    peer_from_der(chain.first()?).ok()
}

/// Bearer tokens that let certificate-less clients in (clients only, never workers or peers).
/// Only the blake3 hashes of the tokens are kept, and a presented token is compared with every
/// one of them in constant time.
#[derive(Clone, Default)]
pub struct ClientTokens {
    hashes: Vec<blake3::Hash>,
}

impl fmt::Debug for ClientTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientTokens({} tokens)", self.hashes.len())
    }
}

impl ClientTokens {
    /// No token accepted: every client needs a certificate.
    pub fn none() -> ClientTokens {
        ClientTokens::default()
    }

    /// Accepts each of `tokens`.
    pub fn new<I, S>(tokens: I) -> ClientTokens
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        ClientTokens {
            hashes: tokens
                .into_iter()
                .map(|t| blake3::hash(t.as_ref().as_bytes()))
                .collect(),
        }
    }

    /// Whether no token is configured.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Whether `presented` is one of the tokens. Takes the same time whichever token matches,
    /// or none (`blake3::Hash` equality is constant-time; every entry is compared).
    pub fn verify(&self, presented: &str) -> bool {
        let presented = blake3::hash(presented.as_bytes());
        self.hashes
            .iter()
            .fold(false, |found, hash| found | (*hash == presented))
    }
}

/// A new random bearer token: 32 bytes from the system's secure random source, in hex.
pub fn generate_token() -> Result<String, TlsError> {
    let mut bytes = [0u8; 32];
    provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| TlsError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What [`write_dev_pki`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPki {
    /// `<dir>/ca.crt`: give it to every node.
    pub ca_cert: PathBuf,
    /// `<dir>/ca.key` (mode 0600): keep it to issue more identities.
    pub ca_key: PathBuf,
    /// One entry per node, in the order given: coordinators, workers, clients.
    pub identities: Vec<IdentityFiles>,
}

impl DevPki {
    /// The files of the node `name` in `role`.
    pub fn identity(&self, role: Role, name: &str) -> Option<&IdentityFiles> {
        self.identities
            .iter()
            .find(|files| files.role == role && files.name == name)
    }
}

/// The host part of a coordinator address (`10.0.0.1:7400`, `[::1]:7400`, `coord-1.svc:7400`,
/// or a bare host), for the certificate's subject alternative names.
fn host_of(addr: &str) -> &str {
    if let Ok(sock) = SocketAddr::from_str(addr) {
        return match sock {
            SocketAddr::V4(_) => addr.rsplit_once(':').map_or(addr, |(host, _)| host),
            SocketAddr::V6(_) => addr
                .rsplit_once(':')
                .map_or(addr, |(host, _)| host)
                .trim_start_matches('[')
                .trim_end_matches(']'),
        };
    }
    if IpAddr::from_str(addr).is_ok() {
        return addr;
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => host,
        _ => addr,
    }
}

/// Writes a development PKI into `dir` (created if needed): `ca.crt`, `ca.key`, and
/// `<role>-<name>.crt`/`.key` for every coordinator (its certificate also names the host of
/// its address), worker and client. Key files have mode 0600. What
/// `strata coordinator init --out DIR` calls.
pub fn write_dev_pki(
    dir: &Path,
    coordinators: &[(String, String)],
    workers: &[String],
    clients: &[String],
) -> Result<DevPki, TlsError> {
    let nodes = coordinators
        .iter()
        .map(|(name, addr)| (Role::Coordinator, name, vec![host_of(addr).to_string()]))
        .chain(workers.iter().map(|name| (Role::Worker, name, Vec::new())))
        .chain(clients.iter().map(|name| (Role::Client, name, Vec::new())));
    let mut seen = HashSet::new();
    let mut planned = Vec::new();
    for (role, name, sans) in nodes {
        validate_name(name)?;
        if !seen.insert((role, name.as_str())) {
            return Err(TlsError::InvalidName {
                name: name.clone(),
                reason: format!("two {role}s have this name"),
            });
        }
        planned.push((role, name, sans));
    }

    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let ca = ClusterCa::generate("strata development cluster CA")?;
    let (ca_cert_pem, ca_key_pem) = ca.to_pem();
    let ca_cert = dir.join("ca.crt");
    let ca_key = dir.join("ca.key");
    write_file(&ca_cert, ca_cert_pem.as_bytes(), false)?;
    write_file(&ca_key, ca_key_pem.as_bytes(), true)?;
    let mut identities = Vec::new();
    for (role, name, sans) in planned {
        identities.push(ca.issue(role, name, &sans)?.save(dir)?);
    }
    Ok(DevPki {
        ca_cert,
        ca_key,
        identities,
    })
}

/// Just enough DER to read a certificate's subject and public key: the fields strata needs
/// from a certificate that rustls has already verified (or that this module wrote). Every
/// length is checked; malformed input is an error, never a panic.
mod der {
    pub const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
    pub const OID_ORGANIZATIONAL_UNIT: &[u8] = &[0x55, 0x04, 0x0b];

    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID: u8 = 0x06;
    const VERSION: u8 = 0xa0;
    const UTF8_STRING: u8 = 0x0c;
    const PRINTABLE_STRING: u8 = 0x13;
    const IA5_STRING: u8 = 0x16;

    /// The parts of a certificate strata reads.
    pub struct Parsed<'a> {
        /// The subject `Name`, tag and length included.
        pub subject: &'a [u8],
        /// The `SubjectPublicKeyInfo`, tag and length included.
        pub spki: &'a [u8],
        /// The subject's attributes in order: (OID, string value).
        attributes: Vec<(&'a [u8], &'a str)>,
    }

    impl<'a> Parsed<'a> {
        /// The first subject attribute with this OID.
        pub fn attribute(&self, oid: &[u8]) -> Option<&'a str> {
            self.attributes
                .iter()
                .find(|(o, _)| *o == oid)
                .map(|(_, v)| *v)
        }
    }

    struct Reader<'a> {
        rest: &'a [u8],
    }

    struct Tlv<'a> {
        tag: u8,
        contents: &'a [u8],
        whole: &'a [u8],
    }

    impl<'a> Reader<'a> {
        fn new(bytes: &'a [u8]) -> Self {
            Reader { rest: bytes }
        }

        fn is_empty(&self) -> bool {
            self.rest.is_empty()
        }

        fn peek_tag(&self) -> Option<u8> {
            self.rest.first().copied()
        }

        fn next(&mut self) -> Result<Tlv<'a>, String> {
            let bytes = self.rest;
            let (&tag, after_tag) = bytes.split_first().ok_or("unexpected end of DER")?;
            if tag & 0x1f == 0x1f {
                return Err("multi-byte DER tags are not supported".into());
            }
            let (&first, mut after_len) = after_tag.split_first().ok_or("truncated DER length")?;
            let len = if first < 0x80 {
                usize::from(first)
            } else {
                let count = usize::from(first & 0x7f);
                if count == 0 || count > 4 {
                    return Err("unsupported DER length encoding".into());
                }
                if after_len.len() < count {
                    return Err("truncated DER length".into());
                }
                let (len_bytes, rest) = after_len.split_at(count);
                after_len = rest;
                len_bytes
                    .iter()
                    .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
            };
            if after_len.len() < len {
                return Err("DER value runs past the end of its container".into());
            }
            let header = bytes.len() - after_len.len();
            let (contents, rest) = after_len.split_at(len);
            self.rest = rest;
            Ok(Tlv {
                tag,
                contents,
                whole: &bytes[..header + len],
            })
        }

        fn expect(&mut self, tag: u8, what: &str) -> Result<Tlv<'a>, String> {
            let tlv = self.next()?;
            if tlv.tag != tag {
                return Err(format!(
                    "expected {what} (tag {tag:#04x}), found tag {:#04x}",
                    tlv.tag
                ));
            }
            Ok(tlv)
        }
    }

    pub fn parse_certificate(der: &[u8]) -> Result<Parsed<'_>, String> {
        let mut outer = Reader::new(der);
        let certificate = outer.expect(SEQUENCE, "Certificate")?;
        let mut certificate = Reader::new(certificate.contents);
        let tbs = certificate.expect(SEQUENCE, "TBSCertificate")?;
        let mut tbs = Reader::new(tbs.contents);
        if tbs.peek_tag() == Some(VERSION) {
            tbs.next()?;
        }
        tbs.next()?; // serialNumber
        tbs.expect(SEQUENCE, "signature algorithm")?;
        tbs.expect(SEQUENCE, "issuer")?;
        tbs.expect(SEQUENCE, "validity")?;
        let subject = tbs.expect(SEQUENCE, "subject")?;
        let spki = tbs.expect(SEQUENCE, "subjectPublicKeyInfo")?;

        let mut attributes = Vec::new();
        let mut rdns = Reader::new(subject.contents);
        while !rdns.is_empty() {
            let rdn = rdns.expect(SET, "RelativeDistinguishedName")?;
            let mut atvs = Reader::new(rdn.contents);
            while !atvs.is_empty() {
                let atv = atvs.expect(SEQUENCE, "AttributeTypeAndValue")?;
                let mut atv = Reader::new(atv.contents);
                let oid = atv.expect(OID, "attribute type")?;
                let value = atv.next()?;
                if matches!(value.tag, UTF8_STRING | PRINTABLE_STRING | IA5_STRING)
                    && let Ok(value) = std::str::from_utf8(value.contents)
                {
                    attributes.push((oid.contents, value));
                }
            }
        }
        Ok(Parsed {
            subject: subject.whole,
            spki: spki.whole,
            attributes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_identity_carries_role_and_name() {
        let ca = ClusterCa::generate("test CA").unwrap();
        for role in Role::ALL {
            let identity = ca.issue(role, "node-1", &["10.0.0.7".into()]).unwrap();
            assert_eq!(
                identity.peer().unwrap(),
                PeerIdentity {
                    role,
                    name: "node-1".into()
                }
            );
            identity.check("issued identity").unwrap();
        }
    }

    #[test]
    fn ca_round_trips_through_pem_and_still_issues() {
        let ca = ClusterCa::generate("round trip CA").unwrap();
        let (cert, key) = ca.to_pem();
        let loaded = ClusterCa::from_pem(&cert, &key).unwrap();
        assert_eq!(loaded.name(), "round trip CA");
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        // Issued by the loaded CA, verified against the original certificate: the issuer name
        // and key identifier must match byte for byte.
        let identity = loaded.issue(Role::Worker, "w1", &[]).unwrap();
        let leaf = identity.rustls_chain().unwrap().remove(0);
        let roots = root_store(ca.cert_pem()).unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .unwrap();
        verifier
            .verify_client_cert(&leaf, &[], rustls::pki_types::UnixTime::now())
            .unwrap();
    }

    #[test]
    fn ca_from_pem_rejects_a_foreign_key() {
        let ca = ClusterCa::generate("a").unwrap();
        let other = ClusterCa::generate("a").unwrap();
        let err = ClusterCa::from_pem(ca.cert_pem(), &other.to_pem().1).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn identity_check_rejects_a_foreign_key() {
        let ca = ClusterCa::generate("a").unwrap();
        let one = ca.issue(Role::Client, "alice", &[]).unwrap();
        let two = ca.issue(Role::Client, "bob", &[]).unwrap();
        let mixed = Identity {
            cert_chain_pem: one.cert_chain_pem,
            key_pem: two.key_pem,
        };
        let err = mixed.check("mixed").unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn names_must_be_dns_and_file_safe() {
        let ca = ClusterCa::generate("a").unwrap();
        for bad in ["", "a/b", "a b", "10.0.0.1", "..", "ü"] {
            let err = ca.issue(Role::Worker, bad, &[]).unwrap_err();
            assert!(
                matches!(err, TlsError::InvalidName { .. }),
                "{bad:?}: {err}"
            );
        }
        ca.issue(Role::Worker, "arm64-builder_2.eu", &[]).unwrap();
    }

    #[test]
    fn der_reader_never_panics_on_garbage() {
        let ca = ClusterCa::generate("a").unwrap();
        let identity = ca.issue(Role::Worker, "w", &[]).unwrap();
        let der = identity.rustls_chain().unwrap().remove(0).to_vec();
        for cut in 0..der.len() {
            assert!(der::parse_certificate(&der[..cut]).is_err());
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let mut bytes = der.clone();
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = (state as usize) % bytes.len();
                bytes[at] = (state >> 32) as u8;
            }
            let _ = der::parse_certificate(&bytes);
            let _ = peer_from_der(&bytes);
        }
    }

    #[test]
    fn tokens_verify_only_configured_values() {
        let tokens = ClientTokens::new(["alpha", "beta"]);
        assert!(tokens.verify("alpha"));
        assert!(tokens.verify("beta"));
        assert!(!tokens.verify("alph"));
        assert!(!tokens.verify(""));
        assert!(!ClientTokens::none().verify(""));
        let token = generate_token().unwrap();
        assert_eq!(token.len(), 64);
        assert_ne!(token, generate_token().unwrap());
    }

    #[test]
    fn host_of_addresses() {
        assert_eq!(host_of("10.0.0.1:7400"), "10.0.0.1");
        assert_eq!(host_of("[::1]:7400"), "::1");
        assert_eq!(host_of("coord-1.svc:7400"), "coord-1.svc");
        assert_eq!(host_of("coord-1"), "coord-1");
        assert_eq!(host_of("::1"), "::1");
    }

    #[test]
    fn dev_pki_files_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let pki = write_dev_pki(
            dir.path(),
            &[("coord-1".into(), "127.0.0.1:7400".into())],
            &["w1".into()],
            &["alice".into()],
        )
        .unwrap();
        assert_eq!(pki.ca_cert, dir.path().join("ca.crt"));
        assert_eq!(pki.identities.len(), 3);
        let files = pki.identity(Role::Worker, "w1").unwrap();
        assert_eq!(files.cert, dir.path().join("worker-w1.crt"));
        assert_eq!(files.key, dir.path().join("worker-w1.key"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            for key in [&pki.ca_key, &files.key] {
                let mode = std::fs::metadata(key).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", key.display());
            }
        }
        let ca = ClusterCa::from_pem(
            &std::fs::read_to_string(&pki.ca_cert).unwrap(),
            &std::fs::read_to_string(&pki.ca_key).unwrap(),
        )
        .unwrap();
        for files in &pki.identities {
            let identity = Identity::load(&files.cert, &files.key).unwrap();
            assert_eq!(identity.peer().unwrap().role, files.role);
            assert_eq!(identity.peer().unwrap().name, files.name);
            let again = Identity::load_from_dir(dir.path(), files.role, &files.name).unwrap();
            assert_eq!(again.cert_chain_pem, identity.cert_chain_pem);
        }
        ca.issue(Role::Worker, "w2", &[]).unwrap();

        let err = write_dev_pki(dir.path(), &[], &["w1".into(), "w1".into()], &[]).unwrap_err();
        assert!(matches!(err, TlsError::InvalidName { .. }), "{err}");
    }
}
