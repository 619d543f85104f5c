//! A client of the OCI distribution API, used to pull base images and push built ones.
//! [`RegistryClient::resolve`] turns an image reference and a platform into the platform's
//! manifest and verified config ([`ResolvedImage`]), and [`RegistryClient::fetch_blob`] streams
//! a layer to a file, checking its size and sha256 digest. The [`push`] half uploads blobs
//! (skipped when present, mounted from another repository, else in chunks), manifests, and
//! whole images ([`RegistryClient::push_image`]).
//!
//! The transport is shared by every request, pulls and pushes alike:
//! [`RegistryClient::send`] takes a request builder and an [`Access`] (pull or push), answers
//! the registry's `WWW-Authenticate` challenge (a bearer token fetched from the realm,
//! anonymously or with the user's basic credentials, and cached per registry and scope; or
//! basic auth) and retries once. Registries on loopback addresses are spoken to over plain
//! HTTP, every other one over HTTPS (rustls), and `docker.io` is served by
//! `registry-1.docker.io`, as Docker does. Credentials come from the Docker config file
//! ([`Credentials`]).
//!
//! Everything read from a registry is verified before it is used: manifests against the
//! digest asked for or the one the registry reported, the config and layers against the
//! digests and sizes in the manifest. Errors ([`RegistryError`]) name the registry and
//! repository, the tag or digest, and the HTTP status with the registry's own error codes;
//! the underlying cause (I/O, HTTP, JSON) is their `source()`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::platform::Platform;
use crate::reference::{DOCKER_HUB, ImageRef};
use base64::Engine as _;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, WWW_AUTHENTICATE};
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

pub mod push;
pub use push::{
    BlobSource, DEFAULT_CHUNK_SIZE, PUSH_CONCURRENCY, PushOutcome, PushParts, PushReport,
};

/// OCI image index (a multi-platform image).
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list v2 (a multi-platform image).
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest v2 schema 2.
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The `Accept` header of manifest requests: the four manifest kinds this client reads.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";
/// Largest manifest read into memory (containerd's limit).
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest image config read into memory.
const MAX_CONFIG_BYTES: u64 = 32 << 20;
/// Largest error or token body read into memory.
const MAX_SMALL_BODY: u64 = 1 << 20;
/// Bearer tokens live at least this long when the token server says less (Docker's rule).
const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// A cached token is dropped this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);
/// The header in which a registry reports a manifest's digest.
const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

// ---------------------------------------------------------------------------------------------
// Credentials

/// A user name and password for one registry. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicAuth {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BasicAuth")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// Registry credentials, keyed by registry host as in an [`ImageRef`] (`docker.io`,
/// `127.0.0.1:5000`), read from the `auths` of a Docker config file.
///
/// An entry gives either `auth` (base64 of `user:password`) or `username` and `password`.
/// Keys are normalised as Docker does: a scheme and path are dropped
/// (`https://index.docker.io/v1/` is `docker.io`). `credsStore` and `credHelpers` are ignored:
/// credential helpers are not run, and entries they left empty are skipped. Identity tokens
/// (`identitytoken`) are not used.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    by_registry: BTreeMap<String, BasicAuth>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.by_registry.keys()).finish()
    }
}

#[derive(Deserialize)]
struct DockerConfigFile {
    #[serde(default, deserialize_with = "nullable")]
    auths: BTreeMap<String, DockerAuthEntry>,
}

#[derive(Deserialize, Default)]
struct DockerAuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl Credentials {
    /// No credentials: every request is anonymous.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads `$DOCKER_CONFIG/config.json`, or `~/.docker/config.json` when `DOCKER_CONFIG` is
    /// unset. A missing file means no credentials. Blocking (a small file).
    pub fn from_environment() -> Result<Self, RegistryError> {
        let docker_config = std::env::var_os("DOCKER_CONFIG");
        let home = std::env::var_os("HOME").map(PathBuf::from);
        match docker_config_path(docker_config.as_deref(), home.as_deref()) {
            Some(path) => Self::from_file(&path),
            None => Ok(Self::none()),
        }
    }

    /// Reads a Docker config file; a missing file means no credentials. Blocking.
    pub fn from_file(path: &Path) -> Result<Self, RegistryError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::parse(&bytes, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::none()),
            Err(source) => Err(RegistryError::ConfigRead {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses the text of a Docker config file; `path` is only used in errors.
    pub fn parse(json: &[u8], path: &Path) -> Result<Self, RegistryError> {
        let file: DockerConfigFile =
            serde_json::from_slice(json).map_err(|source| RegistryError::ConfigParse {
                path: path.to_path_buf(),
                source,
            })?;
        let mut credentials = Self::none();
        for (key, entry) in file.auths {
            let bad = || RegistryError::ConfigAuth {
                path: path.to_path_buf(),
                key: key.clone(),
            };
            let pair = match (&entry.auth, &entry.username, &entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .or_else(|_| {
                            base64::engine::general_purpose::STANDARD_NO_PAD.decode(auth.trim())
                        })
                        .map_err(|_| bad())?;
                    let text = String::from_utf8(decoded).map_err(|_| bad())?;
                    let (user, password) = text.split_once(':').ok_or_else(bad)?;
                    Some((user.to_string(), password.to_string()))
                }
                (_, Some(user), Some(password)) if !user.is_empty() => {
                    Some((user.clone(), password.clone()))
                }
                _ => None,
            };
            if let Some((username, password)) = pair {
                credentials.insert(&key, username, password);
            }
        }
        Ok(credentials)
    }

    /// Adds or replaces the credentials of `registry` (normalised like a config key).
    pub fn insert(
        &mut self,
        registry: &str,
        username: impl Into<String>,
        password: impl Into<String>,
    ) {
        self.by_registry.insert(
            normalize_registry_key(registry),
            BasicAuth {
                username: username.into(),
                password: password.into(),
            },
        );
    }

    /// The credentials of `registry`, if any.
    pub fn get(&self, registry: &str) -> Option<&BasicAuth> {
        self.by_registry.get(&normalize_registry_key(registry))
    }

    /// Whether there are no credentials at all.
    pub fn is_empty(&self) -> bool {
        self.by_registry.is_empty()
    }
}

/// Where the Docker config file is, given the values of `DOCKER_CONFIG` and `HOME`:
/// `$DOCKER_CONFIG/config.json` when that is set and not empty, else `~/.docker/config.json`.
pub fn docker_config_path(docker_config: Option<&OsStr>, home: Option<&Path>) -> Option<PathBuf> {
    match docker_config {
        Some(dir) if !dir.is_empty() => Some(Path::new(dir).join("config.json")),
        _ => home.map(|h| h.join(".docker").join("config.json")),
    }
}

/// A Docker config `auths` key or a registry host, as a registry host: no scheme, no path,
/// lower case, Docker Hub's aliases folded into `docker.io`.
pub fn normalize_registry_key(key: &str) -> String {
    let key = key.trim();
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = rest.split('/').next().unwrap_or(rest).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_string()
        }
        _ => host,
    }
}

// ---------------------------------------------------------------------------------------------
// Transport

/// `scheme://host` at which `registry` (a host as in an [`ImageRef`]) serves the API: plain
/// HTTP on loopback addresses (127.0.0.0/8, ::1, localhost), HTTPS otherwise; `docker.io` is
/// `https://registry-1.docker.io`.
pub fn registry_endpoint(registry: &str) -> String {
    let host = if registry == DOCKER_HUB {
        "registry-1.docker.io"
    } else {
        registry
    };
    let scheme = if is_loopback_registry(registry) {
        "http"
    } else {
        "https"
    };
    format!("{scheme}://{host}")
}

/// Whether `registry` (`host[:port]`, `[v6]:port`) is on a loopback address.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if registry.matches(':').count() == 1 {
        registry.split(':').next().unwrap_or(registry)
    } else {
        registry
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// What a request needs to do in a repository; decides the token scope asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Read manifests and blobs (`repository:NAME:pull`).
    Pull,
    /// Read and write (`repository:NAME:pull,push`).
    Push,
}

impl Access {
    /// The token scope for `repository`.
    pub fn scope(self, repository: &str) -> String {
        match self {
            Access::Pull => format!("repository:{repository}:pull"),
            Access::Push => format!("repository:{repository}:pull,push"),
        }
    }
}

/// One `WWW-Authenticate` challenge: the scheme in lower case and its parameters (names in
/// lower case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: BTreeMap<String, String>,
}

/// Parses a `WWW-Authenticate` header value into its challenges (RFC 7235: a scheme followed
/// by comma-separated `name=value` or `name="quoted value"` parameters; several challenges
/// may share one header). Malformed input gives fewer challenges, never a panic.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let chars: Vec<char> = header.chars().collect();
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied();
    let is_space = |c: char| c == ' ' || c == '\t';
    let skip_spaces = |i: &mut usize| {
        while at(*i).is_some_and(is_space) {
            *i += 1;
        }
    };
    let token = |i: &mut usize, stop_at_eq: bool| {
        let mut out = String::new();
        while let Some(c) = at(*i) {
            if is_space(c) || c == ',' || c == '"' || (stop_at_eq && c == '=') {
                break;
            }
            out.push(c);
            *i += 1;
        }
        out
    };
    let mut challenges = Vec::new();
    loop {
        while at(i).is_some_and(|c| is_space(c) || c == ',') {
            i += 1;
        }
        if i >= chars.len() {
            break;
        }
        let scheme = token(&mut i, true);
        if scheme.is_empty() {
            i += 1;
            continue;
        }
        let mut params = BTreeMap::new();
        loop {
            skip_spaces(&mut i);
            let start = i;
            let name = token(&mut i, true);
            skip_spaces(&mut i);
            if name.is_empty() || at(i) != Some('=') {
                i = start;
                break;
            }
            i += 1;
            skip_spaces(&mut i);
            let value = if at(i) == Some('"') {
                i += 1;
                let mut value = String::new();
                while let Some(c) = at(i) {
                    i += 1;
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(escaped) = at(i) {
                                value.push(escaped);
                                i += 1;
                            }
                        }
                        c => value.push(c),
                    }
                }
                value
            } else {
                token(&mut i, false)
            };
            params.insert(name.to_ascii_lowercase(), value);
            skip_spaces(&mut i);
            if at(i) == Some(',') {
                i += 1;
            } else {
                break;
            }
        }
        challenges.push(Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params,
        });
    }
    challenges
}

#[derive(Default)]
struct AuthState {
    /// `Authorization` values of bearer tokens by (registry, scope).
    tokens: HashMap<(String, String), CachedToken>,
    /// Registries that asked for basic auth: credentials are sent up front from then on.
    basic: HashSet<String>,
}

struct CachedToken {
    authorization: String,
    expires: Instant,
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// A client of OCI distribution registries. Cheap to clone; clones share the token cache.
#[derive(Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    credentials: Arc<Credentials>,
    auth: Arc<Mutex<AuthState>>,
    /// Largest `PATCH` of a chunked blob upload.
    chunk_size: usize,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// A client with the credentials of `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json` (see [`Credentials`]). Reads that file (blocking, small).
    pub fn new() -> Result<Self, RegistryError> {
        Self::with_credentials(Credentials::from_environment()?)
    }

    /// A client with the given credentials.
    pub fn with_credentials(credentials: Credentials) -> Result<Self, RegistryError> {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .user_agent(concat!("strata/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .build()
            .map_err(RegistryError::Client)?;
        Ok(RegistryClient {
            http,
            credentials: Arc::new(credentials),
            auth: Arc::new(Mutex::new(AuthState::default())),
            chunk_size: DEFAULT_CHUNK_SIZE,
        })
    }

    /// The same client uploading blobs in chunks of at most `bytes` (at least 1) per `PATCH`
    /// instead of [`DEFAULT_CHUNK_SIZE`].
    pub fn with_chunk_size(mut self, bytes: usize) -> Self {
        self.chunk_size = bytes.max(1);
        self
    }

    /// The credentials this client sends.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// Sends a request to `registry` about `repository`, authenticating as the registry asks.
    ///
    /// `make` builds the request (its URL from [`registry_endpoint`]); it is called again for
    /// the retry after a `401`, so a request with a body must be able to rebuild it. A cached
    /// bearer token for (`registry`, `access` scope), or basic credentials for a registry that
    /// asked for them before, go with the first attempt. On `401`: a `Bearer` challenge gets a
    /// token from its realm (with the basic credentials of `registry` when the Docker config
    /// has them, anonymously otherwise), a `Basic` challenge gets the basic credentials, and
    /// the request is sent once more. Any status other than `401` is returned as it is, for
    /// the caller to judge; a second `401` is [`RegistryError::Unauthorized`].
    pub async fn send<F>(
        &self,
        registry: &str,
        repository: &str,
        access: Access,
        make: F,
    ) -> Result<reqwest::Response, RegistryError>
    where
        F: Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    {
        self.send_scoped(registry, repository, &[access.scope(repository)], make)
            .await
    }

    /// [`RegistryClient::send`] asking for a token with several scopes (`scopes[0]` for
    /// `repository`, then others, such as pull access to the source of a cross-repository
    /// mount); tokens are cached per registry and scope list.
    async fn send_scoped<F>(
        &self,
        registry: &str,
        repository: &str,
        scopes: &[String],
        make: F,
    ) -> Result<reqwest::Response, RegistryError>
    where
        F: Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    {
        let scope = scopes.join(" ");
        let first = self
            .execute(&make, self.cached_authorization(registry, &scope))
            .await?;
        if first.status() != StatusCode::UNAUTHORIZED {
            return Ok(first);
        }
        let challenges = challenges_of(first.headers());
        let (errors, body) = read_api_errors(first).await;
        let unauthorized = |reason: String| RegistryError::Unauthorized {
            registry: registry.to_string(),
            repository: repository.to_string(),
            reason,
        };
        let authorization = if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let realm = bearer.params.get("realm").ok_or_else(|| {
                unauthorized("the Bearer challenge has no realm to fetch a token from".into())
            })?;
            self.fetch_token(
                registry,
                realm,
                bearer.params.get("service").map(String::as_str),
                scopes,
                bearer.params.get("scope").map(String::as_str),
            )
            .await?
        } else if challenges.iter().any(|c| c.scheme == "basic") {
            let Some(basic) = self.credentials.get(registry) else {
                return Err(unauthorized(format!(
                    "the registry asks for basic auth and the Docker config has no \
                     credentials for {registry}{}",
                    describe_api_errors(&errors, &body)
                )));
            };
            self.lock_auth().basic.insert(registry.to_string());
            basic_authorization(basic)
        } else {
            return Err(unauthorized(format!(
                "HTTP 401 without a Bearer or Basic challenge{}",
                describe_api_errors(&errors, &body)
            )));
        };
        let second = self.execute(&make, Some(authorization)).await?;
        if second.status() == StatusCode::UNAUTHORIZED {
            let (errors, body) = read_api_errors(second).await;
            let whose = match self.credentials.get(registry) {
                Some(c) => format!("the credentials of {:?} were refused", c.username),
                None => format!("anonymous access refused (no credentials for {registry})"),
            };
            return Err(unauthorized(format!(
                "{whose}: HTTP 401{}",
                describe_api_errors(&errors, &body)
            )));
        }
        Ok(second)
    }

    async fn execute<F>(
        &self,
        make: &F,
        authorization: Option<String>,
    ) -> Result<reqwest::Response, RegistryError>
    where
        F: Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    {
        let mut builder = make(&self.http);
        if let Some(value) = authorization {
            builder = builder.header(AUTHORIZATION, value);
        }
        let request = builder.build().map_err(|source| RegistryError::Request {
            method: String::from("(unbuilt request)"),
            url: source.url().map(|u| u.to_string()).unwrap_or_default(),
            source,
        })?;
        let method = request.method().to_string();
        let url = request.url().to_string();
        self.http
            .execute(request)
            .await
            .map_err(|source| RegistryError::Request {
                method,
                url,
                source,
            })
    }

    fn lock_auth(&self) -> std::sync::MutexGuard<'_, AuthState> {
        // The state is a cache: a panic elsewhere cannot leave it inconsistent.
        self.auth.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cached_authorization(&self, registry: &str, scope: &str) -> Option<String> {
        let mut state = self.lock_auth();
        if state.basic.contains(registry) {
            return self.credentials.get(registry).map(basic_authorization);
        }
        let key = (registry.to_string(), scope.to_string());
        match state.tokens.get(&key) {
            Some(t) if t.expires > Instant::now() => Some(t.authorization.clone()),
            Some(_) => {
                state.tokens.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Fetches a bearer token from `realm` (`GET realm?service=..&scope=..`, one `scope` per
    /// entry of `scopes` plus those of the challenge), caches it under the joined `scopes` and
    /// returns the `Authorization` value.
    async fn fetch_token(
        &self,
        registry: &str,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
        challenge_scope: Option<&str>,
    ) -> Result<String, RegistryError> {
        let scope = scopes.join(" ");
        let token_error = |reason: String| RegistryError::Token {
            registry: registry.to_string(),
            realm: realm.to_string(),
            reason,
        };
        let url = reqwest::Url::parse(realm)
            .ok()
            .filter(|u| u.scheme() == "https" || u.scheme() == "http")
            .ok_or_else(|| token_error("the realm is not an http(s) URL".into()))?;
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(service) = service {
            query.push(("service", service));
        }
        for scope in scopes {
            query.push(("scope", scope));
        }
        for extra in challenge_scope.unwrap_or_default().split(' ') {
            if !extra.is_empty() && !scopes.iter().any(|s| s == extra) {
                query.push(("scope", extra));
            }
        }
        let basic = self.credentials.get(registry);
        if let Some(basic) = basic {
            query.push(("account", &basic.username));
        }
        let mut request = self.http.get(url.clone()).query(&query);
        if let Some(basic) = basic {
            request = request.basic_auth(&basic.username, Some(&basic.password));
        }
        tracing::debug!(registry, realm, %scope, "fetching a registry token");
        let response = request
            .send()
            .await
            .map_err(|source| RegistryError::Request {
                method: "GET".into(),
                url: url.to_string(),
                source,
            })?;
        let status = response.status();
        if !status.is_success() {
            let (errors, body) = read_api_errors(response).await;
            let who = match basic {
                Some(b) => format!(" (credentials of {:?})", b.username),
                None => " (anonymous)".to_string(),
            };
            return Err(token_error(format!(
                "HTTP {}{who}{}",
                status.as_u16(),
                describe_api_errors(&errors, &body)
            )));
        }
        let body = read_small(response)
            .await
            .map_err(|e| token_error(e.to_string()))?;
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| token_error(format!("the answer is not a token JSON: {e}")))?;
        let token = answer
            .token
            .filter(|t| !t.is_empty())
            .or(answer.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| token_error("the answer has no token".into()))?;
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(0)).max(MIN_TOKEN_LIFETIME);
        let authorization = format!("Bearer {token}");
        self.lock_auth().tokens.insert(
            (registry.to_string(), scope.to_string()),
            CachedToken {
                authorization: authorization.clone(),
                expires: Instant::now() + lifetime - TOKEN_MARGIN,
            },
        );
        Ok(authorization)
    }
}

fn basic_authorization(basic: &BasicAuth) -> String {
    let pair = format!("{}:{}", basic.username, basic.password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

fn challenges_of(headers: &HeaderMap) -> Vec<Challenge> {
    headers
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(parse_challenges)
        .collect()
}

/// One entry of a registry's error body `{"errors":[{"code","message","detail"}]}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ApiError {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
}

#[derive(Deserialize)]
struct ApiErrors {
    #[serde(default)]
    errors: Vec<ApiError>,
}

/// Reads an error answer: the registry's error codes, or else (the start of) its text.
async fn read_api_errors(response: reqwest::Response) -> (Vec<ApiError>, String) {
    let body = read_small(response).await.unwrap_or_default();
    match serde_json::from_slice::<ApiErrors>(&body) {
        Ok(parsed) if !parsed.errors.is_empty() => (parsed.errors, String::new()),
        _ => {
            let text = String::from_utf8_lossy(&body);
            let text: String = text.trim().chars().take(512).collect();
            (Vec::new(), text)
        }
    }
}

/// `": CODE: message; CODE: message"`, or `": <body text>"`, or nothing.
fn describe_api_errors(errors: &[ApiError], body: &str) -> String {
    if errors.is_empty() {
        return if body.is_empty() {
            String::new()
        } else {
            format!(": {body}")
        };
    }
    let parts: Vec<String> = errors
        .iter()
        .map(|e| match (e.code.is_empty(), e.message.is_empty()) {
            (false, false) => format!("{}: {}", e.code, e.message),
            (false, true) => e.code.clone(),
            _ => e.message.clone(),
        })
        .collect();
    format!(": {}", parts.join("; "))
}

/// Reads a body of at most [`MAX_SMALL_BODY`] bytes (the rest is dropped).
async fn read_small(mut response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = (MAX_SMALL_BODY as usize).saturating_sub(body.len());
        body.extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or_default());
        if body.len() as u64 >= MAX_SMALL_BODY {
            break;
        }
    }
    Ok(body)
}

// ---------------------------------------------------------------------------------------------
// Image types

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
    /// Set on the entries of an image index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<DescriptorPlatform>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The platform of an image index entry, as written by the image's author.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorPlatform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    #[serde(rename = "os.features", default, skip_serializing_if = "Vec::is_empty")]
    pub os_features: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl DescriptorPlatform {
    /// The normalised platform (`arm64/v8` is `arm64`).
    pub fn normalized(&self) -> Platform {
        Platform::new(
            &self.os,
            &self.architecture,
            self.variant.as_deref().unwrap_or_default(),
        )
    }
}

/// An OCI image index or Docker manifest list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image manifest or Docker image manifest v2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    #[serde(default, deserialize_with = "nullable")]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image config (OCI image config / Docker image JSON): the fields a build uses. The
/// verified bytes are in [`ResolvedImage::config_bytes`] for anything else.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub architecture: String,
    #[serde(default, deserialize_with = "nullable")]
    pub os: String,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The container defaults (`config` in the JSON).
    #[serde(default, deserialize_with = "nullable")]
    pub config: ContainerConfig,
    #[serde(default, deserialize_with = "nullable")]
    pub rootfs: RootFs,
    #[serde(default, deserialize_with = "nullable")]
    pub history: Vec<History>,
}

impl ImageConfig {
    /// The platform the config declares, normalised.
    pub fn platform(&self) -> Platform {
        Platform::new(
            &self.os,
            &self.architecture,
            self.variant.as_deref().unwrap_or_default(),
        )
    }
}

/// The `config` object of an image config: what a container of the image starts with.
/// `null` in the JSON reads as empty; `Entrypoint` and `Cmd` keep the difference between
/// absent (`None`) and empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub user: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub exposed_ports: BTreeMap<String, serde_json::Value>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub volumes: BTreeMap<String, serde_json::Value>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub working_dir: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "String::is_empty"
    )]
    pub stop_signal: String,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub on_build: Vec<String>,
    #[serde(
        default,
        deserialize_with = "nullable",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub shell: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_escaped: Option<bool>,
}

/// The `rootfs` of an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type", default, deserialize_with = "nullable")]
    pub kind: String,
    /// sha256 of each layer's uncompressed tar, in layer order.
    #[serde(default, deserialize_with = "nullable")]
    pub diff_ids: Vec<String>,
}

/// One `history` entry of an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

/// Reads `null` as the type's default.
fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// An image resolved for one platform, every part verified against its digest.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedImage {
    /// Digest of the index or manifest list the reference named, when it named one.
    pub index_digest: Option<String>,
    /// sha256 of the platform's manifest.
    pub manifest_digest: String,
    /// Media type of the platform's manifest (OCI or Docker).
    pub manifest_media_type: String,
    /// The manifest bytes exactly as served (they hash to `manifest_digest`).
    pub manifest_bytes: Vec<u8>,
    pub manifest: ImageManifest,
    /// The image config blob (verified against the manifest's config descriptor).
    pub config_bytes: Vec<u8>,
    pub config: ImageConfig,
    /// The layers, bottom first (the manifest's `layers`).
    pub layers: Vec<Descriptor>,
}

impl ResolvedImage {
    /// The normalised platform the image config declares.
    pub fn platform(&self) -> Platform {
        self.config.platform()
    }
}

// ---------------------------------------------------------------------------------------------
// Platform matching

/// How well an image for `candidate` serves a request for `wanted`: `None` when it cannot run
/// there, else a rank, 0 for the best. Both are normalised platforms (containerd's
/// normalisation, which [`Platform::new`] applies: `arm64/v8` is `arm64`). OS and architecture
/// must be equal; a variant must be equal, except that an `amd64` request for `vN` accepts
/// `v1`..`vN` and an `arm` request for `vN` accepts `v5`..`vN`, the nearest preferred, as
/// containerd does. Unlike containerd's default matcher it never falls back to another
/// architecture (`386` on `amd64`, `arm` on `arm64`): a wrong-architecture base is an error.
pub fn platform_rank(candidate: &Platform, wanted: &Platform) -> Option<u32> {
    if candidate.os != wanted.os || candidate.architecture != wanted.architecture {
        return None;
    }
    if candidate.variant == wanted.variant {
        return Some(0);
    }
    let level = |variant: &str, default: u32| -> Option<u32> {
        if variant.is_empty() {
            Some(default)
        } else {
            variant.strip_prefix('v')?.parse().ok()
        }
    };
    let (lowest, default) = match wanted.architecture.as_str() {
        "amd64" => (1, 1),
        "arm" => (5, 7),
        _ => return None,
    };
    let want = level(&wanted.variant, default)?;
    let have = level(&candidate.variant, default)?;
    (lowest <= have && have <= want).then(|| want - have)
}

/// The entry of an index that best serves `wanted` (see [`platform_rank`]); the first of
/// equally good ones. Entries without a platform are never chosen.
pub fn select_manifest<'a>(
    manifests: &'a [Descriptor],
    wanted: &Platform,
) -> Option<&'a Descriptor> {
    manifests
        .iter()
        .filter_map(|d| {
            let platform = d.platform.as_ref()?.normalized();
            platform_rank(&platform, wanted).map(|rank| (rank, d))
        })
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, d)| d)
}

/// The platforms an index offers, normalised, without duplicates and without the
/// `unknown/unknown` entries of attestations.
fn offered_platforms(index: &ImageIndex) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for entry in &index.manifests {
        let Some(p) = &entry.platform else { continue };
        let name = p.normalized().to_string();
        if p.os != "unknown" && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Pulling

/// A manifest as fetched: bytes checked against the expected digest.
struct FetchedManifest {
    digest: String,
    media_type: String,
    bytes: Vec<u8>,
}

enum ManifestDoc {
    Index(ImageIndex),
    Image(Box<ImageManifest>),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestProbe {
    #[serde(default)]
    schema_version: Option<u64>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    config: Option<serde::de::IgnoredAny>,
}

/// What a blob is, for errors.
#[derive(Clone, Copy)]
enum BlobKind {
    Config,
    Layer,
}

impl BlobKind {
    fn name(self) -> &'static str {
        match self {
            BlobKind::Config => "config",
            BlobKind::Layer => "blob",
        }
    }
}

static PARTIAL_COUNTER: AtomicU64 = AtomicU64::new(0);

impl RegistryClient {
    /// Resolves `image` for `platform`: fetches the manifest the reference names (its digest
    /// when it has one, else its tag) and, when that is an index or manifest list, the entry
    /// matching `platform` (see [`platform_rank`]), then the image config.
    ///
    /// Every manifest is checked against the digest it was asked for (a digest reference or
    /// an index entry) or else the `Docker-Content-Digest` the registry reported, and an index
    /// entry against its size; the config against its descriptor. A single-platform image
    /// whose config names another platform is [`RegistryError::PlatformMismatch`]; an index
    /// without the platform is [`RegistryError::NoMatchingPlatform`], listing what it has.
    pub async fn resolve(
        &self,
        image: &ImageRef,
        platform: &Platform,
    ) -> Result<ResolvedImage, RegistryError> {
        check_repository(image)?;
        let reference = match (&image.digest, &image.tag) {
            (Some(digest), _) => {
                check_digest(image, digest)?;
                digest.clone()
            }
            (None, Some(tag)) => {
                check_tag(image, tag)?;
                tag.clone()
            }
            (None, None) => "latest".to_string(),
        };
        let top = self
            .fetch_manifest(image, &reference, image.digest.as_deref(), None)
            .await?;
        let (index_digest, fetched, manifest) = match parse_manifest(image, &reference, &top)? {
            ManifestDoc::Image(manifest) => (None, top, *manifest),
            ManifestDoc::Index(index) => {
                let entry = select_manifest(&index.manifests, platform).ok_or_else(|| {
                    RegistryError::NoMatchingPlatform {
                        image: image.to_string(),
                        wanted: platform.to_string(),
                        available: offered_platforms(&index),
                    }
                })?;
                check_digest(image, &entry.digest)?;
                let child = self
                    .fetch_manifest(image, &entry.digest, Some(&entry.digest), Some(entry.size))
                    .await?;
                match parse_manifest(image, &entry.digest, &child)? {
                    ManifestDoc::Image(manifest) => (Some(top.digest), child, *manifest),
                    ManifestDoc::Index(_) => {
                        return Err(RegistryError::InvalidManifest {
                            image: image.name(),
                            reference: entry.digest.clone(),
                            reason: format!(
                                "the entry for {platform} is itself an index (nested indexes \
                                 are not supported)"
                            ),
                        });
                    }
                }
            }
        };
        check_digest(image, &manifest.config.digest)?;
        for layer in &manifest.layers {
            check_digest(image, &layer.digest)?;
        }
        let config_bytes = self.fetch_config(image, &manifest.config).await?;
        let config: ImageConfig = serde_json::from_slice(&config_bytes).map_err(|source| {
            RegistryError::InvalidConfig {
                image: image.name(),
                digest: manifest.config.digest.clone(),
                source,
            }
        })?;
        if index_digest.is_none() && platform_rank(&config.platform(), platform).is_none() {
            return Err(RegistryError::PlatformMismatch {
                image: image.to_string(),
                wanted: platform.to_string(),
                found: config.platform().to_string(),
            });
        }
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(RegistryError::LayerCountMismatch {
                image: image.name(),
                manifest_digest: fetched.digest,
                layers: manifest.layers.len(),
                diff_ids: config.rootfs.diff_ids.len(),
            });
        }
        tracing::debug!(
            image = %image,
            %platform,
            manifest = %fetched.digest,
            layers = manifest.layers.len(),
            "resolved image"
        );
        Ok(ResolvedImage {
            index_digest,
            manifest_digest: fetched.digest,
            manifest_media_type: fetched.media_type,
            manifest_bytes: fetched.bytes,
            layers: manifest.layers.clone(),
            manifest,
            config_bytes,
            config,
        })
    }

    /// Streams blob `digest` of `image`'s repository to the file `dest`, verifying its
    /// sha256 (and its length against `Content-Length`); returns its size. Redirects (to a
    /// CDN or object store) are followed. The bytes go to a temporary file beside `dest`,
    /// renamed to `dest` once verified; on any error nothing is left at `dest` (a file that
    /// was there is removed too) and the error names the digest.
    pub async fn fetch_blob(
        &self,
        image: &ImageRef,
        digest: &str,
        dest: &Path,
    ) -> Result<u64, RegistryError> {
        self.fetch_blob_checked(image, digest, None, dest).await
    }

    /// [`RegistryClient::fetch_blob`] for a descriptor: also checks the size it gives, and
    /// stops reading as soon as the registry sends more.
    pub async fn fetch_descriptor(
        &self,
        image: &ImageRef,
        descriptor: &Descriptor,
        dest: &Path,
    ) -> Result<u64, RegistryError> {
        self.fetch_blob_checked(image, &descriptor.digest, Some(descriptor.size), dest)
            .await
    }

    async fn fetch_blob_checked(
        &self,
        image: &ImageRef,
        digest: &str,
        size: Option<u64>,
        dest: &Path,
    ) -> Result<u64, RegistryError> {
        check_repository(image)?;
        check_digest(image, digest)?;
        let write_error = |path: &Path, source: std::io::Error| RegistryError::Write {
            image: image.name(),
            digest: digest.to_string(),
            path: path.to_path_buf(),
            source,
        };
        let name = dest.file_name().ok_or_else(|| {
            write_error(
                dest,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"),
            )
        })?;
        let partial = dest.with_file_name(format!(
            ".{}.{}-{}.partial",
            name.to_string_lossy(),
            std::process::id(),
            PARTIAL_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = match self.download(image, digest, size, &partial).await {
            Ok(n) => tokio::fs::rename(&partial, dest)
                .await
                .map(|()| n)
                .map_err(|e| write_error(dest, e)),
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
            let _ = tokio::fs::remove_file(dest).await;
        }
        result
    }

    async fn download(
        &self,
        image: &ImageRef,
        digest: &str,
        size: Option<u64>,
        path: &Path,
    ) -> Result<u64, RegistryError> {
        let mut response = self.open_blob(image, digest, BlobKind::Layer).await?;
        let announced = response.content_length();
        let size_error = |expected: u64, actual: u64| RegistryError::SizeMismatch {
            image: image.name(),
            what: "blob",
            reference: digest.to_string(),
            expected,
            actual,
        };
        if let (Some(expected), Some(announced)) = (size, announced)
            && expected != announced
        {
            return Err(size_error(expected, announced));
        }
        let write_error = |source| RegistryError::Write {
            image: image.name(),
            digest: digest.to_string(),
            path: path.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::create(path).await.map_err(write_error)?;
        let mut hasher = Sha256::new();
        let mut received: u64 = 0;
        loop {
            let chunk = response
                .chunk()
                .await
                .map_err(|source| RegistryError::Transfer {
                    image: image.name(),
                    what: "blob",
                    reference: digest.to_string(),
                    received,
                    source,
                })?;
            let Some(chunk) = chunk else { break };
            received += chunk.len() as u64;
            if let Some(expected) = size
                && received > expected
            {
                return Err(size_error(expected, received));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(write_error)?;
        }
        file.flush().await.map_err(write_error)?;
        drop(file);
        if let Some(expected) = size.or(announced)
            && received != expected
        {
            return Err(size_error(expected, received));
        }
        let actual = format!("sha256:{}", hex(&hasher.finalize()));
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                image: image.name(),
                what: "blob",
                reference: digest.to_string(),
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(received)
    }

    /// `GET /v2/<repository>/blobs/<digest>`, status checked.
    async fn open_blob(
        &self,
        image: &ImageRef,
        digest: &str,
        kind: BlobKind,
    ) -> Result<reqwest::Response, RegistryError> {
        let url = format!(
            "{}/v2/{}/blobs/{digest}",
            registry_endpoint(&image.registry),
            image.repository
        );
        let response = self
            .send(&image.registry, &image.repository, Access::Pull, |http| {
                http.get(&url)
            })
            .await?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            let (errors, _) = read_api_errors(response).await;
            return Err(RegistryError::BlobNotFound {
                image: image.name(),
                digest: digest.to_string(),
                errors,
            });
        }
        if !status.is_success() {
            let (errors, body) = read_api_errors(response).await;
            return Err(RegistryError::Status {
                image: image.name(),
                what: kind.name(),
                reference: digest.to_string(),
                status: status.as_u16(),
                errors,
                body,
            });
        }
        Ok(response)
    }

    /// Reads the config blob into memory, checked against its descriptor.
    async fn fetch_config(
        &self,
        image: &ImageRef,
        descriptor: &Descriptor,
    ) -> Result<Vec<u8>, RegistryError> {
        if descriptor.size > MAX_CONFIG_BYTES {
            return Err(RegistryError::TooLarge {
                image: image.name(),
                what: "config",
                reference: descriptor.digest.clone(),
                limit: MAX_CONFIG_BYTES,
            });
        }
        let response = self
            .open_blob(image, &descriptor.digest, BlobKind::Config)
            .await?;
        let bytes = read_limited(
            response,
            image,
            "config",
            &descriptor.digest,
            descriptor.size,
        )
        .await?;
        verify(
            image,
            "config",
            &descriptor.digest,
            Some(descriptor.size),
            &bytes,
        )?;
        Ok(bytes)
    }

    /// `GET /v2/<repository>/manifests/<reference>`, checked against `expected_digest` (else
    /// the digest the registry reported) and `expected_size`.
    async fn fetch_manifest(
        &self,
        image: &ImageRef,
        reference: &str,
        expected_digest: Option<&str>,
        expected_size: Option<u64>,
    ) -> Result<FetchedManifest, RegistryError> {
        if let Some(size) = expected_size
            && size > MAX_MANIFEST_BYTES
        {
            return Err(RegistryError::TooLarge {
                image: image.name(),
                what: "manifest",
                reference: reference.to_string(),
                limit: MAX_MANIFEST_BYTES,
            });
        }
        let url = format!(
            "{}/v2/{}/manifests/{reference}",
            registry_endpoint(&image.registry),
            image.repository
        );
        let response = self
            .send(&image.registry, &image.repository, Access::Pull, |http| {
                http.get(&url).header(ACCEPT, MANIFEST_ACCEPT)
            })
            .await?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            let (errors, _) = read_api_errors(response).await;
            return Err(RegistryError::ManifestNotFound {
                image: image.name(),
                reference: reference.to_string(),
                errors,
            });
        }
        if !status.is_success() {
            let (errors, body) = read_api_errors(response).await;
            return Err(RegistryError::Status {
                image: image.name(),
                what: "manifest",
                reference: reference.to_string(),
                status: status.as_u16(),
                errors,
                body,
            });
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .unwrap_or_default()
            .trim()
            .to_string();
        let reported = response
            .headers()
            .get(DOCKER_CONTENT_DIGEST)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string());
        let limit = expected_size.unwrap_or(MAX_MANIFEST_BYTES);
        let bytes = read_limited(response, image, "manifest", reference, limit).await?;
        let expected = match (expected_digest, &reported) {
            (Some(asked), _) => Some(asked.to_string()),
            (None, Some(reported)) => {
                check_digest(image, reported)?;
                Some(reported.clone())
            }
            (None, None) => None,
        };
        let digest =
            verify(image, "manifest", reference, expected_size, &bytes).and_then(|actual| {
                match expected {
                    Some(expected) if expected != actual => Err(RegistryError::DigestMismatch {
                        image: image.name(),
                        what: "manifest",
                        reference: reference.to_string(),
                        expected,
                        actual,
                    }),
                    _ => Ok(actual),
                }
            })?;
        Ok(FetchedManifest {
            digest,
            media_type: content_type,
            bytes,
        })
    }
}

/// Reads a whole body into memory; more than `limit` bytes is an error.
async fn read_limited(
    mut response: reqwest::Response,
    image: &ImageRef,
    what: &'static str,
    reference: &str,
    limit: u64,
) -> Result<Vec<u8>, RegistryError> {
    let mut bytes = Vec::new();
    loop {
        let chunk = response
            .chunk()
            .await
            .map_err(|source| RegistryError::Transfer {
                image: image.name(),
                what,
                reference: reference.to_string(),
                received: bytes.len() as u64,
                source,
            })?;
        let Some(chunk) = chunk else { break };
        if (bytes.len() + chunk.len()) as u64 > limit {
            return Err(RegistryError::TooLarge {
                image: image.name(),
                what,
                reference: reference.to_string(),
                limit,
            });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// Checks `bytes` against `size`, and against `reference` when that is a digest; returns
/// their digest.
fn verify(
    image: &ImageRef,
    what: &'static str,
    reference: &str,
    size: Option<u64>,
    bytes: &[u8],
) -> Result<String, RegistryError> {
    if let Some(expected) = size
        && expected != bytes.len() as u64
    {
        return Err(RegistryError::SizeMismatch {
            image: image.name(),
            what,
            reference: reference.to_string(),
            expected,
            actual: bytes.len() as u64,
        });
    }
    let actual = sha256_digest(bytes);
    if reference.starts_with("sha256:") && reference != actual {
        return Err(RegistryError::DigestMismatch {
            image: image.name(),
            what,
            reference: reference.to_string(),
            expected: reference.to_string(),
            actual,
        });
    }
    Ok(actual)
}

/// Classifies a fetched manifest by its `mediaType` field, else its `Content-Type`, else its
/// shape (an OCI document may omit `mediaType`).
fn parse_manifest(
    image: &ImageRef,
    reference: &str,
    fetched: &FetchedManifest,
) -> Result<ManifestDoc, RegistryError> {
    let invalid = |reason: String| RegistryError::InvalidManifest {
        image: image.name(),
        reference: reference.to_string(),
        reason,
    };
    let probe: ManifestProbe = serde_json::from_slice(&fetched.bytes)
        .map_err(|e| invalid(format!("not a JSON manifest: {e}")))?;
    let media_type = probe
        .media_type
        .clone()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| fetched.media_type.clone());
    let is_index = match media_type.as_str() {
        MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST => true,
        MEDIA_OCI_MANIFEST | MEDIA_DOCKER_MANIFEST => false,
        _ if probe.schema_version == Some(2) && probe.manifests.is_some() => true,
        _ if probe.schema_version == Some(2) && probe.config.is_some() => false,
        _ => {
            return Err(RegistryError::UnsupportedMediaType {
                image: image.name(),
                reference: reference.to_string(),
                media_type,
            });
        }
    };
    if probe.schema_version != Some(2) {
        return Err(invalid(format!(
            "schemaVersion {:?}, only 2 is supported",
            probe.schema_version
        )));
    }
    if is_index {
        serde_json::from_slice(&fetched.bytes)
            .map(ManifestDoc::Index)
            .map_err(|e| invalid(e.to_string()))
    } else {
        serde_json::from_slice(&fetched.bytes)
            .map(|m| ManifestDoc::Image(Box::new(m)))
            .map_err(|e| invalid(e.to_string()))
    }
}

/// Accepts only `sha256:<64 lowercase hex digits>`, the only digest this client can verify;
/// this also keeps digests from a manifest out of URL paths unless they are plain hex.
fn check_digest(image: &ImageRef, digest: &str) -> Result<(), RegistryError> {
    let ok = digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidDigest {
            image: image.name(),
            digest: digest.to_string(),
        })
    }
}

fn check_tag(image: &ImageRef, tag: &str) -> Result<(), RegistryError> {
    let ok = tag.len() <= 128
        && tag
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidReference {
            image: image.to_string(),
            reason: format!("invalid tag {tag:?}"),
        })
    }
}

/// The repository goes into URL paths: lower-case components of `[a-z0-9._-]`.
fn check_repository(image: &ImageRef) -> Result<(), RegistryError> {
    let ok = !image.repository.is_empty()
        && image.repository.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidReference {
            image: image.to_string(),
            reason: format!("invalid repository {:?}", image.repository),
        })
    }
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "no platform entries".to_string()
    } else {
        items.join(", ")
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Why a registry operation failed. `image` is `registry/repository` where the error also
/// names the tag or digest, and the whole reference otherwise; the underlying cause (I/O,
/// HTTP, JSON), if any, is the `source()`, so print the chain.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read Docker config {}", path.display())]
    ConfigRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid Docker config {}", path.display())]
    ConfigParse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "invalid Docker config {}: the `auth` of {key:?} is not base64 of user:password",
        path.display()
    )]
    ConfigAuth { path: PathBuf, key: String },
    #[error("cannot create the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("{image}: {reason}")]
    InvalidReference { image: String, reason: String },
    #[error(
        "{image}: invalid digest {digest:?}: only sha256:<64 lowercase hex digits> is supported"
    )]
    InvalidDigest { image: String, digest: String },
    #[error("{method} {url} failed")]
    Request {
        method: String,
        url: String,
        source: reqwest::Error,
    },
    #[error("{registry}: access to {repository} denied: {reason}")]
    Unauthorized {
        registry: String,
        repository: String,
        reason: String,
    },
    #[error("{registry}: cannot get a token from {realm}: {reason}")]
    Token {
        registry: String,
        realm: String,
        reason: String,
    },
    #[error(
        "{image}: manifest {reference} not found (HTTP 404{})",
        describe_api_errors(errors, "")
    )]
    ManifestNotFound {
        image: String,
        reference: String,
        errors: Vec<ApiError>,
    },
    #[error(
        "{image}: blob {digest} not found (HTTP 404{})",
        describe_api_errors(errors, "")
    )]
    BlobNotFound {
        image: String,
        digest: String,
        errors: Vec<ApiError>,
    },
    #[error(
        "{image}: {what} {reference}: HTTP {status}{}",
        describe_api_errors(errors, body)
    )]
    Status {
        image: String,
        what: &'static str,
        reference: String,
        status: u16,
        errors: Vec<ApiError>,
        body: String,
    },
    #[error("{image}: {what} {reference} is larger than {limit} bytes")]
    TooLarge {
        image: String,
        what: &'static str,
        reference: String,
        limit: u64,
    },
    #[error("{image}: {what} {reference}: transfer failed after {received} bytes")]
    Transfer {
        image: String,
        what: &'static str,
        reference: String,
        received: u64,
        source: reqwest::Error,
    },
    #[error("{image}: {what} {reference}: the content has digest {actual}, expected {expected}")]
    DigestMismatch {
        image: String,
        what: &'static str,
        reference: String,
        expected: String,
        actual: String,
    },
    #[error("{image}: {what} {reference}: {actual} bytes, expected {expected}")]
    SizeMismatch {
        image: String,
        what: &'static str,
        reference: String,
        expected: u64,
        actual: u64,
    },
    #[error("{image}: cannot write blob {digest} to {}", path.display())]
    Write {
        image: String,
        digest: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{image}: manifest {reference} has unsupported media type {media_type:?}")]
    UnsupportedMediaType {
        image: String,
        reference: String,
        media_type: String,
    },
    #[error("{image}: invalid manifest {reference}: {reason}")]
    InvalidManifest {
        image: String,
        reference: String,
        reason: String,
    },
    #[error("{image}: invalid image config {digest}")]
    InvalidConfig {
        image: String,
        digest: String,
        source: serde_json::Error,
    },
    #[error(
        "{image}: manifest {manifest_digest} has {layers} layers but its config lists {diff_ids} diff_ids"
    )]
    LayerCountMismatch {
        image: String,
        manifest_digest: String,
        layers: usize,
        diff_ids: usize,
    },
    #[error(
        "no match for platform {wanted} in the manifest list of {image}; it has {}",
        list(available)
    )]
    NoMatchingPlatform {
        image: String,
        wanted: String,
        available: Vec<String>,
    },
    #[error("{image} is a single-platform image for {found}, not {wanted}")]
    PlatformMismatch {
        image: String,
        wanted: String,
        found: String,
    },
    #[error("{image}: {what} {reference}: the registry's answer is invalid: {reason}")]
    InvalidResponse {
        image: String,
        what: &'static str,
        reference: String,
        reason: String,
    },
    #[error("{image}: cannot read blob {digest} to push from {}", path.display())]
    ReadSource {
        image: String,
        digest: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{image}: cannot read blob {digest} to push from the blob store")]
    Store {
        image: String,
        digest: String,
        source: Box<crate::store::StoreError>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Read as _;
    use std::sync::OnceLock;

    use serde_json::{Value, json};
    use strata_testkit::stub::{StubRequest, StubResponse, StubServer};
    use strata_testkit::{Registry, busybox_layout, busybox_registry, read_layout_blob};

    pub(super) fn anonymous() -> RegistryClient {
        RegistryClient::with_credentials(Credentials::none()).unwrap()
    }

    pub(super) fn image(addr: &str, rest: &str) -> ImageRef {
        ImageRef::parse(&format!("{addr}/{rest}")).unwrap()
    }

    fn platform(s: &str) -> Platform {
        s.parse().unwrap()
    }

    /// The error and its sources, as `a: b: c`.
    pub(super) fn chain(e: &dyn std::error::Error) -> String {
        let mut out = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            out.push_str(": ");
            out.push_str(&s.to_string());
            source = s.source();
        }
        out
    }

    fn files_in(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// The fixture layout's index digest and its manifest digest per architecture.
    fn layout_digests(layout: &Path) -> (String, HashMap<String, String>) {
        let top: Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        let index_digest = top["manifests"][0]["digest"].as_str().unwrap().to_string();
        let index: Value =
            serde_json::from_slice(&read_layout_blob(layout, &index_digest)).unwrap();
        let by_arch = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["platform"]["architecture"].as_str().unwrap().to_string(),
                    m["digest"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        (index_digest, by_arch)
    }

    // --- against Debian's docker-registry serving the busybox fixture -------------------------

    /// An index resolves to the manifest of the asked platform, arm64 and arm64/v8 alike, by
    /// tag or by digest, with the config read and typed; a platform manifest asked for by its
    /// digest resolves on its own.
    #[tokio::test]
    async fn resolves_busybox_for_amd64_and_arm64() {
        let registry = busybox_registry();
        let addr = registry.addr();
        let (index_digest, by_arch) = layout_digests(&busybox_layout());
        let client = anonymous();
        for (wanted, arch) in [
            ("linux/amd64", "amd64"),
            ("linux/arm64", "arm64"),
            ("linux/arm64/v8", "arm64"),
        ] {
            for reference in [
                "library/busybox:latest".to_string(),
                "library/busybox:1.36".to_string(),
                format!("library/busybox@{index_digest}"),
            ] {
                let r = client
                    .resolve(&image(&addr, &reference), &platform(wanted))
                    .await
                    .unwrap_or_else(|e| panic!("{reference} {wanted}: {}", chain(&e)));
                assert_eq!(r.index_digest.as_deref(), Some(index_digest.as_str()));
                assert_eq!(r.manifest_digest, by_arch[arch], "{reference} {wanted}");
                assert_eq!(sha256_digest(&r.manifest_bytes), r.manifest_digest);
                assert_eq!(r.manifest_media_type, MEDIA_OCI_MANIFEST);
                assert_eq!(sha256_digest(&r.config_bytes), r.manifest.config.digest);
                assert_eq!(r.config.os, "linux");
                assert_eq!(r.config.architecture, arch);
                assert_eq!(r.platform(), platform(wanted));
                assert_eq!(r.config.config.cmd, Some(vec!["sh".to_string()]));
                assert_eq!(r.config.config.env, [strata_testkit::BUSYBOX_ENV_PATH]);
                assert_eq!(r.config.config.entrypoint, None);
                assert_eq!(r.layers.len(), 1);
                assert_eq!(r.layers, r.manifest.layers);
                assert_eq!(r.config.rootfs.diff_ids.len(), 1);
                assert_eq!(r.config.history.len(), 1);
            }
        }
        let direct = client
            .resolve(
                &image(&addr, &format!("library/busybox@{}", by_arch["arm64"])),
                &platform("linux/arm64"),
            )
            .await
            .unwrap();
        assert_eq!(direct.index_digest, None);
        assert_eq!(direct.manifest_digest, by_arch["arm64"]);
    }

    /// Every blob of both platforms comes down byte for byte, with its size returned; each
    /// layer's uncompressed sha256 is its config's diff_id.
    #[tokio::test]
    async fn fetches_every_blob_and_checks_it() {
        let registry = busybox_registry();
        let layout = busybox_layout();
        let busybox = image(&registry.addr(), "library/busybox:latest");
        let client = anonymous();
        let dir = tempfile::tempdir().unwrap();
        for wanted in ["linux/amd64", "linux/arm64"] {
            let r = client.resolve(&busybox, &platform(wanted)).await.unwrap();
            let config_path = dir.path().join(format!("{}-config", r.config.architecture));
            let n = client
                .fetch_blob(&busybox, &r.manifest.config.digest, &config_path)
                .await
                .unwrap();
            assert_eq!(n, r.manifest.config.size);
            assert_eq!(std::fs::read(&config_path).unwrap(), r.config_bytes);
            for (i, layer) in r.layers.iter().enumerate() {
                let path = dir
                    .path()
                    .join(format!("{}-layer{i}", r.config.architecture));
                let n = client
                    .fetch_descriptor(&busybox, layer, &path)
                    .await
                    .unwrap();
                assert_eq!(n, layer.size);
                let bytes = std::fs::read(&path).unwrap();
                assert_eq!(bytes, read_layout_blob(&layout, &layer.digest));
                let mut tar = Vec::new();
                flate2::read::GzDecoder::new(&bytes[..])
                    .read_to_end(&mut tar)
                    .unwrap();
                assert_eq!(sha256_digest(&tar), r.config.rootfs.diff_ids[i]);
            }
        }
        let mut names = files_in(dir.path());
        names.sort();
        assert_eq!(
            names,
            [
                "amd64-config",
                "amd64-layer0",
                "arm64-config",
                "arm64-layer0"
            ],
            "temporary files left behind"
        );
    }

    /// A platform the index lacks names the image and lists the platforms it has; a
    /// single-platform manifest for another platform is refused too.
    #[tokio::test]
    async fn platform_missing_from_the_index_lists_what_it_has() {
        let registry = busybox_registry();
        let addr = registry.addr();
        let client = anonymous();
        let busybox = image(&addr, "library/busybox:latest");
        for wanted in [
            "linux/s390x",
            "linux/arm/v7",
            "linux/amd64/v3x",
            "windows/amd64",
        ] {
            let err = client
                .resolve(&busybox, &platform(wanted))
                .await
                .unwrap_err();
            match &err {
                RegistryError::NoMatchingPlatform {
                    image,
                    wanted: w,
                    available,
                } => {
                    assert_eq!(image, &busybox.to_string());
                    assert_eq!(w, &platform(wanted).to_string());
                    assert_eq!(available, &["linux/amd64", "linux/arm64"]);
                }
                other => panic!("{wanted}: {}", chain(other)),
            }
            let message = err.to_string();
            assert!(
                message.contains(&format!("no match for platform {}", platform(wanted)))
                    && message.contains(&addr)
                    && message.ends_with("it has linux/amd64, linux/arm64"),
                "{message}"
            );
        }
        // An amd64/v2 host runs v1 images: the amd64 entry (v1) serves it.
        let v2 = client
            .resolve(&busybox, &platform("linux/amd64/v2"))
            .await
            .unwrap();
        assert_eq!(v2.config.architecture, "amd64");

        let (_, by_arch) = layout_digests(&busybox_layout());
        let single = image(&addr, &format!("library/busybox@{}", by_arch["amd64"]));
        let err = client
            .resolve(&single, &platform("linux/arm64"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RegistryError::PlatformMismatch { found, .. } if found == "linux/amd64"),
            "{}",
            chain(&err)
        );
    }

    /// A tag, repository or blob the registry lacks is an error naming it, with the
    /// registry's own error code; a failed fetch leaves no file.
    #[tokio::test]
    async fn missing_tag_repository_and_blob_are_clear_errors() {
        let registry = busybox_registry();
        let addr = registry.addr();
        let client = anonymous();
        let amd64 = platform("linux/amd64");

        let err = client
            .resolve(&image(&addr, "library/busybox:nope"), &amd64)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::ManifestNotFound { .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "{addr}/library/busybox: manifest nope not found \
                 (HTTP 404: MANIFEST_UNKNOWN: manifest unknown)"
            )
        );

        let err = client
            .resolve(&image(&addr, "team/absent:1.0"), &amd64)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RegistryError::ManifestNotFound { reference, .. } if reference == "1.0"),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&format!("{addr}/team/absent")),
            "{err}"
        );

        let absent = format!("sha256:{}", "0".repeat(64));
        let err = client
            .resolve(&image(&addr, &format!("library/busybox@{absent}")), &amd64)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("manifest {absent} not found")),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("blob");
        let busybox = image(&addr, "library/busybox:latest");
        let err = client
            .fetch_blob(&busybox, &absent, &dest)
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::BlobNotFound { .. }), "{err:?}");
        assert!(err.to_string().contains(&absent), "{err}");
        assert!(files_in(dir.path()).is_empty());

        let err = client
            .fetch_blob(&busybox, "sha256:../../etc/passwd", &dest)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::InvalidDigest { .. }),
            "{err:?}"
        );
    }

    /// Against a registry with htpasswd basic auth, credentials from a Docker config file
    /// (which also has a credsStore, credHelpers and an empty entry) pull the image; no or
    /// wrong credentials are refused with an error that says so.
    #[tokio::test]
    async fn basic_auth_credentials_from_a_docker_config() {
        let registry = Registry::start_with_basic_auth("strata", "s3cret");
        let addr = registry.addr();
        registry.push_layout(&busybox_layout(), "team/busybox:v1");
        let app = image(&addr, "team/busybox:v1");
        let amd64 = platform("linux/amd64");

        let config_dir = tempfile::tempdir().unwrap();
        let config_path = config_dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("strata:s3cret");
        std::fs::write(
            &config_path,
            serde_json::to_vec(&json!({
                "auths": {
                    format!("http://{addr}"): { "auth": auth },
                    "https://index.docker.io/v1/": {},
                },
                "credsStore": "desktop",
                "credHelpers": { "gcr.io": "gcloud" },
            }))
            .unwrap(),
        )
        .unwrap();
        let credentials = Credentials::from_file(&config_path).unwrap();
        let client = RegistryClient::with_credentials(credentials).unwrap();
        let resolved = client.resolve(&app, &amd64).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        let n = client
            .fetch_descriptor(&app, &resolved.layers[0], &layer)
            .await
            .unwrap();
        assert_eq!(n, resolved.layers[0].size);

        let err = anonymous().resolve(&app, &amd64).await.unwrap_err();
        assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains(&format!("the Docker config has no credentials for {addr}")),
            "{err}"
        );

        let mut wrong = Credentials::none();
        wrong.insert(&addr, "strata", "wrong");
        let err = RegistryClient::with_credentials(wrong)
            .unwrap()
            .resolve(&app, &amd64)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("the credentials of \"strata\" were refused: HTTP 401"),
            "{err}"
        );
    }

    // --- against scripted servers: failures a real registry does not produce on demand --------

    /// A hand-made single-layer amd64 image: (manifest, config, layer) bytes.
    fn handmade_image() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let layer = b"pretend this is a tar stream of a layer".repeat(100);
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Env": null, "Cmd": ["sh"], "OnBuild": null },
            "rootfs": { "type": "layers", "diff_ids": [sha256_digest(&layer)] },
        }))
        .unwrap();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256_digest(&config),
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": sha256_digest(&layer),
                "size": layer.len(),
            }],
        }))
        .unwrap();
        (manifest, config, layer)
    }

    fn manifest_response(manifest: &[u8], reported_digest: &str) -> StubResponse {
        StubResponse::new(200)
            .header("Content-Type", MEDIA_OCI_MANIFEST)
            .header("Docker-Content-Digest", reported_digest)
            .body(manifest.to_vec())
    }

    /// A stub answering the given paths and 404 with a registry error body elsewhere.
    fn routes(map: HashMap<String, StubResponse>) -> StubServer {
        StubServer::start(move |req: &StubRequest| {
            map.get(req.path()).cloned().unwrap_or_else(|| {
                StubResponse::new(404).json(&json!({
                    "errors": [{ "code": "BLOB_UNKNOWN", "message": "blob unknown to registry" }]
                }))
            })
        })
    }

    /// A blob whose bytes do not hash to its digest is refused whether fetched by digest or
    /// by descriptor, and nothing is left at `dest`, not even a file that was there before.
    #[tokio::test]
    async fn corrupt_blob_is_rejected_and_leaves_no_file() {
        let (_, _, layer) = handmade_image();
        let digest = sha256_digest(&layer);
        let mut corrupt = layer.clone();
        corrupt[10] ^= 0xff;
        let stub = routes(HashMap::from([(
            format!("/v2/team/app/blobs/{digest}"),
            StubResponse::new(200).body(corrupt),
        )]));
        let app = image(&stub.addr(), "team/app:1");
        let client = anonymous();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("layer");
        std::fs::write(&dest, b"stale").unwrap();
        let err = client.fetch_blob(&app, &digest, &dest).await.unwrap_err();
        match &err {
            RegistryError::DigestMismatch {
                expected, actual, ..
            } => {
                assert_eq!(expected, &digest);
                assert_eq!(
                    actual,
                    &sha256_digest(&{
                        let mut c = layer.clone();
                        c[10] ^= 0xff;
                        c
                    })
                );
            }
            other => panic!("{}", chain(other)),
        }
        assert!(err.to_string().contains(&digest), "{err}");
        assert!(
            files_in(dir.path()).is_empty(),
            "{:?}",
            files_in(dir.path())
        );

        let descriptor = Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            digest: digest.clone(),
            size: layer.len() as u64,
            platform: None,
            urls: Vec::new(),
            annotations: BTreeMap::new(),
        };
        let err = client
            .fetch_descriptor(&app, &descriptor, &dest)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::DigestMismatch { .. }),
            "{err:?}"
        );
        let wrong_size = Descriptor {
            size: descriptor.size + 1,
            ..descriptor
        };
        let err = client
            .fetch_descriptor(&app, &wrong_size, &dest)
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::SizeMismatch { .. }), "{err:?}");
        assert!(files_in(dir.path()).is_empty());
    }

    /// A manifest that does not hash to the digest the registry reported, or whose config
    /// does not hash to the manifest's config digest, is refused.
    #[tokio::test]
    async fn corrupt_manifest_or_config_is_rejected() {
        let (manifest, config, _) = handmade_image();
        let manifest_digest = sha256_digest(&manifest);
        let config_digest = sha256_digest(&config);
        let other = format!("sha256:{}", "ab".repeat(32));
        let mut bad_config = config.clone();
        bad_config[0] = b' ';
        let stub = routes(HashMap::from([
            (
                "/v2/team/app/manifests/lying".to_string(),
                manifest_response(&manifest, &other),
            ),
            (
                "/v2/team/app/manifests/good".to_string(),
                manifest_response(&manifest, &manifest_digest),
            ),
            (
                format!("/v2/team/app/blobs/{config_digest}"),
                StubResponse::new(200).body(bad_config),
            ),
        ]));
        let client = anonymous();
        let amd64 = platform("linux/amd64");
        let err = client
            .resolve(&image(&stub.addr(), "team/app:lying"), &amd64)
            .await
            .unwrap_err();
        match &err {
            RegistryError::DigestMismatch {
                what,
                expected,
                actual,
                ..
            } => {
                assert_eq!(*what, "manifest");
                assert_eq!(expected, &other);
                assert_eq!(actual, &manifest_digest);
            }
            e => panic!("{}", chain(e)),
        }
        let err = client
            .resolve(&image(&stub.addr(), "team/app:good"), &amd64)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RegistryError::DigestMismatch { what: "config", expected, .. }
                if *expected == config_digest),
            "{}",
            chain(&err)
        );
    }

    /// A body cut short of its Content-Length is a transfer error naming the digest, and
    /// leaves no file.
    #[tokio::test]
    async fn truncated_blob_is_an_error_and_leaves_no_file() {
        let (_, _, layer) = handmade_image();
        let digest = sha256_digest(&layer);
        let stub = routes(HashMap::from([(
            format!("/v2/team/app/blobs/{digest}"),
            StubResponse::new(200)
                .body(layer.clone())
                .truncated(layer.len() / 2),
        )]));
        let app = image(&stub.addr(), "team/app:1");
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("layer");
        let err = anonymous()
            .fetch_blob(&app, &digest, &dest)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RegistryError::Transfer { reference, .. } if *reference == digest),
            "{}",
            chain(&err)
        );
        assert!(err.to_string().contains(&digest), "{err}");
        assert!(
            files_in(dir.path()).is_empty(),
            "{:?}",
            files_in(dir.path())
        );
    }

    /// A blob request answered with a redirect (as registries backed by a CDN or object store
    /// do) is followed to the bytes.
    #[tokio::test]
    async fn blob_redirects_are_followed() {
        let (_, _, layer) = handmade_image();
        let digest = sha256_digest(&layer);
        let stub = routes(HashMap::from([
            (
                format!("/v2/team/app/blobs/{digest}"),
                StubResponse::new(307).header("Location", "/storage/object-1"),
            ),
            (
                "/storage/object-1".to_string(),
                StubResponse::new(200).body(layer.clone()),
            ),
        ]));
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("layer");
        let n = anonymous()
            .fetch_blob(&image(&stub.addr(), "team/app:1"), &digest, &dest)
            .await
            .unwrap();
        assert_eq!(n, layer.len() as u64);
        assert_eq!(std::fs::read(&dest).unwrap(), layer);
    }

    /// A scripted registry answering `401` with a Bearer challenge unless a request carries
    /// `Bearer tok-1`, with its realm (`/token`) handing out that token when the service,
    /// scope and credentials (basic auth, or none) are as expected.
    fn token_registry(credentials: Option<(&'static str, &'static str)>) -> StubServer {
        let (manifest, config, layer) = handmade_image();
        let mut blobs = HashMap::new();
        blobs.insert("/v2/team/app/manifests/1".to_string(), {
            let d = sha256_digest(&manifest);
            manifest_response(&manifest, &d)
        });
        blobs.insert(
            format!("/v2/team/app/blobs/{}", sha256_digest(&config)),
            StubResponse::new(200).body(config),
        );
        blobs.insert(
            format!("/v2/team/app/blobs/{}", sha256_digest(&layer)),
            StubResponse::new(200).body(layer),
        );
        let own_addr: Arc<OnceLock<String>> = Arc::new(OnceLock::new());
        let realm_addr = Arc::clone(&own_addr);
        let stub = StubServer::start(move |req| {
            let addr = realm_addr.get().cloned().unwrap_or_default();
            if req.path() == "/token" {
                let basic_ok = match credentials {
                    Some((u, p)) => {
                        let want = format!(
                            "Basic {}",
                            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                        );
                        req.header("authorization") == Some(want.as_str())
                    }
                    None => req.header("authorization").is_none(),
                };
                let query_ok = req.query("service") == ["fake-registry"]
                    && req.query("scope") == ["repository:team/app:pull"];
                if !basic_ok || !query_ok {
                    return StubResponse::new(401).json(&json!({
                        "errors": [{ "code": "UNAUTHORIZED", "message": "bad token request" }]
                    }));
                }
                return StubResponse::new(200)
                    .json(&json!({ "token": "tok-1", "expires_in": 300 }));
            }
            if req.header("authorization") != Some("Bearer tok-1") {
                return StubResponse::new(401)
                    .header(
                        "WWW-Authenticate",
                        &format!(
                            "Bearer realm=\"http://{addr}/token\",service=\"fake-registry\",\
                             scope=\"repository:team/app:pull\""
                        ),
                    )
                    .json(&json!({
                        "errors": [{ "code": "UNAUTHORIZED", "message": "authentication required" }]
                    }));
            }
            blobs
                .get(req.path())
                .cloned()
                .unwrap_or_else(|| StubResponse::new(404))
        });
        own_addr.set(stub.addr()).unwrap();
        stub
    }

    /// The client's side of the token flow, checked against a scripted registry (a fake, not
    /// a real token server): the token is fetched once for the scope, with the challenge's
    /// service and scope and, when the Docker config has credentials, basic auth and
    /// `account`; the request is retried with it, and later requests reuse it. A realm that
    /// refuses the credentials gives an error naming the realm and the status.
    #[tokio::test]
    async fn bearer_token_flow_against_a_fake_registry() {
        for credentials in [None, Some(("robot", "pa55"))] {
            let stub = token_registry(credentials);
            let app = image(&stub.addr(), "team/app:1");
            let mut creds = Credentials::none();
            if let Some((u, p)) = credentials {
                creds.insert(&stub.addr(), u, p);
            }
            let client = RegistryClient::with_credentials(creds).unwrap();
            let amd64 = platform("linux/amd64");
            let resolved = client.resolve(&app, &amd64).await.unwrap();
            let dir = tempfile::tempdir().unwrap();
            client
                .fetch_descriptor(&app, &resolved.layers[0], &dir.path().join("layer"))
                .await
                .unwrap();
            client.resolve(&app, &amd64).await.unwrap();

            let requests = stub.requests();
            let token_requests: Vec<_> = requests.iter().filter(|r| r.path() == "/token").collect();
            assert_eq!(token_requests.len(), 1, "{requests:#?}");
            if let Some((user, _)) = credentials {
                assert_eq!(token_requests[0].query("account"), [user]);
            }
            // One refused attempt, then everything carries the token.
            let registry_requests: Vec<_> =
                requests.iter().filter(|r| r.path() != "/token").collect();
            assert_eq!(registry_requests[0].header("authorization"), None);
            assert!(
                registry_requests[1..]
                    .iter()
                    .all(|r| r.header("authorization") == Some("Bearer tok-1")),
                "{registry_requests:#?}"
            );
            assert_eq!(registry_requests.len(), 1 + 3 + 2);
        }

        // A token server that refuses the credentials: the error names realm and status.
        let stub = token_registry(Some(("robot", "pa55")));
        let mut wrong = Credentials::none();
        wrong.insert(&stub.addr(), "robot", "nope");
        let err = RegistryClient::with_credentials(wrong)
            .unwrap()
            .resolve(&image(&stub.addr(), "team/app:1"), &platform("linux/amd64"))
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Token { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains(&format!(
                "cannot get a token from http://{}/token",
                stub.addr()
            )) && message
                .contains("HTTP 401 (credentials of \"robot\"): UNAUTHORIZED: bad token request"),
            "{message}"
        );
    }

    // --- pure parts -----------------------------------------------------------------------

    #[test]
    fn parses_www_authenticate_challenges() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].params["realm"], "https://auth.docker.io/token");
        assert_eq!(c[0].params["service"], "registry.docker.io");
        assert_eq!(c[0].params["scope"], "repository:library/busybox:pull,push");

        let c = parse_challenges(
            r#"Basic realm="a \"quoted\" realm", Bearer realm=http://x/t , error=insufficient_scope"#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].params["realm"], "a \"quoted\" realm");
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].params["realm"], "http://x/t");
        assert_eq!(c[1].params["error"], "insufficient_scope");

        assert_eq!(parse_challenges("BASIC")[0].scheme, "basic");
        for garbage in [
            "",
            ",,,",
            "=",
            "\"",
            "Bearer realm=\"unterminated",
            "a=b=c,,=\"",
        ] {
            let _ = parse_challenges(garbage);
        }
    }

    #[test]
    fn loopback_registries_use_plain_http() {
        for (registry, endpoint) in [
            ("127.0.0.1:5000", "http://127.0.0.1:5000"),
            ("127.3.2.1", "http://127.3.2.1"),
            ("localhost:5000", "http://localhost:5000"),
            ("localhost", "http://localhost"),
            ("[::1]:5000", "http://[::1]:5000"),
            ("docker.io", "https://registry-1.docker.io"),
            ("ghcr.io", "https://ghcr.io"),
            ("10.0.0.1:5000", "https://10.0.0.1:5000"),
            ("128.0.0.1", "https://128.0.0.1"),
            ("localhost.example.com", "https://localhost.example.com"),
        ] {
            assert_eq!(registry_endpoint(registry), endpoint, "{registry}");
        }
        assert_eq!(
            Access::Pull.scope("library/busybox"),
            "repository:library/busybox:pull"
        );
        assert_eq!(Access::Push.scope("a/b"), "repository:a/b:pull,push");
    }

    #[test]
    fn reads_credentials_from_a_docker_config() {
        let path = Path::new("/cfg/config.json");
        let text = json!({
            "auths": {
                "https://index.docker.io/v1/": { "auth": base64::engine::general_purpose::STANDARD.encode("hub:pw:with:colons") },
                "http://127.0.0.1:5000/v2/": { "username": "u", "password": "p" },
                "ghcr.io": { "auth": base64::engine::general_purpose::STANDARD_NO_PAD.encode("gh:x") },
                "quay.io": {},
                "empty.io": { "auth": "" },
            },
            "credsStore": "osxkeychain",
            "credHelpers": { "gcr.io": "gcloud" },
            "HttpHeaders": { "X-Meta": "1" },
        });
        let c = Credentials::parse(&serde_json::to_vec(&text).unwrap(), path).unwrap();
        let hub = c.get("docker.io").unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("hub", "pw:with:colons")
        );
        assert_eq!(c.get("127.0.0.1:5000").unwrap().username, "u");
        assert_eq!(c.get("ghcr.io").unwrap().password, "x");
        assert!(c.get("quay.io").is_none() && c.get("empty.io").is_none());
        assert!(!format!("{hub:?}").contains("pw:with"));

        let bad = br#"{"auths": {"r.io": {"auth": "bm90LWEtcGFpcg=="}}}"#;
        let err = Credentials::parse(bad, path).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid Docker config /cfg/config.json: the `auth` of \"r.io\" is not base64 of user:password"
        );
        let err = Credentials::parse(b"{not json", path).unwrap_err();
        assert!(matches!(err, RegistryError::ConfigParse { .. }));
        assert!(Credentials::parse(b"{}", path).unwrap().is_empty());
        assert!(
            Credentials::parse(br#"{"auths": null}"#, path)
                .unwrap()
                .is_empty()
        );

        let dir = tempfile::tempdir().unwrap();
        assert!(
            Credentials::from_file(&dir.path().join("absent.json"))
                .unwrap()
                .is_empty()
        );
        let err = Credentials::from_file(dir.path()).unwrap_err();
        assert!(matches!(err, RegistryError::ConfigRead { .. }), "{err:?}");
    }

    #[test]
    fn docker_config_path_prefers_docker_config() {
        let home = Path::new("/home/u");
        assert_eq!(
            docker_config_path(Some(OsStr::new("/etc/dc")), Some(home)),
            Some(PathBuf::from("/etc/dc/config.json"))
        );
        assert_eq!(
            docker_config_path(Some(OsStr::new("")), Some(home)),
            Some(PathBuf::from("/home/u/.docker/config.json"))
        );
        assert_eq!(
            docker_config_path(None, Some(home)),
            Some(PathBuf::from("/home/u/.docker/config.json"))
        );
        assert_eq!(docker_config_path(None, None), None);
    }

    fn entry(platform: &str, digest_byte: &str) -> Descriptor {
        let mut parts = platform.split('/');
        Descriptor {
            media_type: MEDIA_OCI_MANIFEST.into(),
            digest: format!("sha256:{}", digest_byte.repeat(64)),
            size: 1,
            platform: Some(DescriptorPlatform {
                os: parts.next().unwrap().into(),
                architecture: parts.next().unwrap().into(),
                variant: parts.next().map(str::to_string),
                os_version: None,
                os_features: Vec::new(),
            }),
            urls: Vec::new(),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn platform_matching_follows_containerd_normalisation() {
        let index = vec![
            entry("unknown/unknown", "0"),
            entry("linux/amd64", "1"),
            entry("linux/amd64/v3", "2"),
            entry("linux/arm64/v8", "3"),
            entry("linux/arm/v6", "4"),
            entry("linux/386", "5"),
        ];
        let pick = |p: &str| {
            select_manifest(&index, &platform(p)).map(|d| d.digest.chars().last().unwrap())
        };
        assert_eq!(pick("linux/amd64"), Some('1'));
        assert_eq!(pick("linux/amd64/v2"), Some('1'));
        assert_eq!(pick("linux/amd64/v3"), Some('2'));
        assert_eq!(pick("linux/amd64/v4"), Some('2'));
        assert_eq!(pick("linux/arm64"), Some('3'));
        assert_eq!(pick("linux/arm64/v8"), Some('3'));
        assert_eq!(pick("linux/aarch64"), Some('3'));
        assert_eq!(pick("linux/arm/v7"), Some('4'));
        assert_eq!(pick("linux/arm/v5"), None);
        assert_eq!(pick("linux/386"), Some('5'));
        assert_eq!(pick("linux/s390x"), None);
        assert_eq!(pick("windows/amd64"), None);
        // No architecture fallback: arm64 never gets arm, amd64 never gets 386.
        let only_386 = vec![entry("linux/386", "5"), entry("linux/arm/v7", "6")];
        assert!(select_manifest(&only_386, &platform("linux/amd64")).is_none());
        assert!(select_manifest(&only_386, &platform("linux/arm64")).is_none());
        // arm64 entries written without a variant match arm64/v8 requests.
        let plain = vec![entry("linux/arm64", "7")];
        assert!(select_manifest(&plain, &platform("linux/arm64/v8")).is_some());

        let offered = offered_platforms(&ImageIndex {
            schema_version: 2,
            media_type: None,
            manifests: index,
            annotations: BTreeMap::new(),
        });
        assert_eq!(
            offered,
            [
                "linux/amd64",
                "linux/amd64/v3",
                "linux/arm64",
                "linux/arm/v6",
                "linux/386"
            ]
        );
    }

    /// Docker-written configs carry `null` for empty fields; they read as empty, and `Cmd`
    /// keeps absent apart from empty.
    #[test]
    fn image_config_reads_docker_nulls() {
        let config: ImageConfig = serde_json::from_value(json!({
            "architecture": "arm64",
            "variant": "v8",
            "os": "linux",
            "config": {
                "User": "app", "Env": null, "Entrypoint": null, "Cmd": [], "WorkingDir": "/srv",
                "OnBuild": null, "Labels": null, "Volumes": { "/data": {} },
                "ExposedPorts": { "80/tcp": {} }, "StopSignal": "SIGQUIT",
                "Healthcheck": { "Test": ["CMD", "true"] }, "Shell": ["/bin/bash", "-c"],
            },
            "rootfs": { "type": "layers", "diff_ids": null },
            "history": [{ "created_by": "x", "empty_layer": true }],
        }))
        .unwrap();
        assert_eq!(config.platform(), platform("linux/arm64"));
        assert_eq!(config.config.user, "app");
        assert!(config.config.env.is_empty() && config.config.on_build.is_empty());
        assert_eq!(config.config.entrypoint, None);
        assert_eq!(config.config.cmd, Some(Vec::new()));
        assert_eq!(config.config.working_dir, "/srv");
        assert!(config.config.volumes.contains_key("/data"));
        assert!(config.config.exposed_ports.contains_key("80/tcp"));
        assert_eq!(config.config.shell, ["/bin/bash", "-c"]);
        assert!(config.rootfs.diff_ids.is_empty());
        assert!(config.history[0].empty_layer);
        let again: ImageConfig =
            serde_json::from_slice(&serde_json::to_vec(&config).unwrap()).unwrap();
        assert_eq!(again, config);
        assert!(serde_json::from_value::<ImageConfig>(json!({"config": null})).is_ok());
    }

    #[test]
    fn only_plain_sha256_digests_are_accepted() {
        let img = ImageRef::parse("r.io/a/b").unwrap();
        assert!(check_digest(&img, &format!("sha256:{}", "0a".repeat(32))).is_ok());
        for bad in [
            "sha256:".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha512:{}", "a".repeat(128)),
            format!("sha256:{}/../x", "a".repeat(60)),
            "latest".to_string(),
        ] {
            assert!(check_digest(&img, &bad).is_err(), "{bad}");
        }
        let mut odd = img.clone();
        odd.repository = "a/../b".into();
        assert!(check_repository(&odd).is_err());
        assert!(check_tag(&img, "v1.0-rc_1").is_ok());
        assert!(check_tag(&img, "../x").is_err());
    }
}
