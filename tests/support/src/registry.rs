//! Debian's `docker-registry` on a free loopback port, for tests.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;

use crate::{busybox_layout, run_ok};

const REGISTRY_HINT: &str = "apt-get install -y docker-registry";
const SKOPEO_HINT: &str = "apt-get install -y skopeo";
const HTPASSWD_HINT: &str = "apt-get install -y apache2-utils";
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A Debian `docker-registry` serving plain HTTP on `127.0.0.1:<free port>`, its storage in a
/// temporary directory; the process is killed and the storage removed on drop.
pub struct Registry {
    child: Child,
    addr: String,
    credentials: Option<(String, String)>,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Starts an open registry and waits (at most 10 s) until `GET /v2/` answers 200.
    /// Panics with the install command if `docker-registry` is missing.
    pub fn start() -> Registry {
        Self::start_inner(None)
    }

    /// Starts a registry that requires HTTP basic auth (`auth: htpasswd:`), with one user whose
    /// bcrypt entry is made by `htpasswd -Bbn` (Debian `apache2-utils`). Ready when `GET /v2/`
    /// with these credentials answers 200.
    pub fn start_with_basic_auth(username: &str, password: &str) -> Registry {
        Self::start_inner(Some((username.to_string(), password.to_string())))
    }

    fn start_inner(credentials: Option<(String, String)>) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("strata-registry.")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let auth = match &credentials {
            Some((user, password)) => {
                let out = run_ok(
                    Command::new("htpasswd").args(["-Bbn", user, password]),
                    HTPASSWD_HINT,
                );
                let htpasswd = dir.path().join("htpasswd");
                fs::write(&htpasswd, &out.stdout)
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", htpasswd.display()));
                format!(
                    "auth:\n  htpasswd:\n    realm: strata-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        // Port 0 lets the registry pick a free port, which it logs as "listening on ADDR":
        // no window in which another process could take a port chosen for it.
        let config = dir.path().join("config.yml");
        let storage = dir.path().join("storage");
        let yaml = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:0\n{auth}",
            storage.display()
        );
        fs::write(&config, yaml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let log_path = dir.path().join("registry.log");
        let log = fs::File::create(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone a file handle: {e}"));
        let mut child = match Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
        {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "docker-registry is not installed (needed by strata's registry tests); \
                 install it with: {REGISTRY_HINT}"
            ),
            Err(e) => panic!("cannot start docker-registry: {e}"),
        };
        match wait_ready(&mut child, &log_path, credentials.as_ref()) {
            Ok(addr) => Registry {
                child,
                addr,
                credentials,
                dir,
            },
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                panic!("docker-registry did not become ready: {why}\n{log}");
            }
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The basic-auth user and password, for a registry started with
    /// [`Registry::start_with_basic_auth`].
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The registry's storage root directory.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Pushes every platform of an OCI layout as `repo:tag`, with
    /// `skopeo copy --all --dest-tls-verify=false oci:DIR docker://ADDR/REPO:TAG` (plus
    /// `--dest-creds` on a registry with basic auth). Panics with skopeo's output on failure.
    pub fn push_layout(&self, layout: &Path, repo_tag: &str) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--all", "--dest-tls-verify=false"]);
        if let Some((user, password)) = &self.credentials {
            cmd.arg("--dest-creds").arg(format!("{user}:{password}"));
        }
        cmd.arg(format!("oci:{}", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.addr));
        run_ok(&mut cmd, SKOPEO_HINT);
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until the registry has logged its address and `GET /v2/` answers 200 there; fails
/// when the process exits or [`READY_TIMEOUT`] passes. Returns the address.
fn wait_ready(
    child: &mut Child,
    log: &Path,
    credentials: Option<&(String, String)>,
) -> Result<String, String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut addr = None;
    let mut last = String::from("no \"listening on\" line in the log");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("docker-registry exited at start ({status})"));
        }
        if addr.is_none() {
            addr = listening_addr(&fs::read_to_string(log).unwrap_or_default());
        }
        if let Some(addr) = &addr {
            match get_v2(addr, credentials) {
                Ok(200) => return Ok(addr.clone()),
                Ok(code) => last = format!("GET /v2/ answered {code}"),
                Err(e) => last = e,
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("not ready after {READY_TIMEOUT:?}: {last}"))
}

/// The address in the registry's `msg="listening on 127.0.0.1:PORT"` log line.
fn listening_addr(log: &str) -> Option<String> {
    let rest = log.split("listening on ").nth(1)?;
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();
    addr.rsplit_once(':')
        .filter(|(_, port)| !port.is_empty())
        .map(|_| addr.clone())
}

/// `GET /v2/` over a raw socket; returns the status code.
fn get_v2(addr: &str, credentials: Option<&(String, String)>) -> Result<u16, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let auth = match credentials {
        Some((u, p)) => format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        ),
        None => String::new(),
    };
    write!(
        stream,
        "GET /v2/ HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&head);
    text.get(9..12)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {text:?}"))
}

/// [`Registry::start`], then [`busybox_layout`] pushed as `library/busybox:latest` and
/// `library/busybox:1.36`.
pub fn busybox_registry() -> Registry {
    let registry = Registry::start();
    let layout = busybox_layout();
    registry.push_layout(&layout, "library/busybox:latest");
    registry.push_layout(&layout, "library/busybox:1.36");
    registry
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry starts, takes the busybox image and kills its process on drop.
    #[test]
    fn busybox_registry_serves_pushed_tags_and_stops_on_drop() {
        let registry = busybox_registry();
        let addr = registry.addr();
        let tags = Command::new("skopeo")
            .args(["list-tags", "--tls-verify=false"])
            .arg(format!("docker://{addr}/library/busybox"))
            .output()
            .unwrap();
        assert!(tags.status.success(), "{tags:?}");
        let tags = String::from_utf8_lossy(&tags.stdout);
        assert!(
            tags.contains("\"latest\"") && tags.contains("\"1.36\""),
            "{tags}"
        );
        let pid = registry.child.id();
        drop(registry);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists() || {
                let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                stat.contains(") Z ")
            }
        );
        assert!(TcpStream::connect(&addr).is_err(), "{addr} still answers");
    }

    /// With basic auth, the ready check and the push both use the credentials.
    #[test]
    fn basic_auth_registry_accepts_its_user() {
        let registry = Registry::start_with_basic_auth("strata", "s3cret");
        registry.push_layout(&busybox_layout(), "team/busybox:v1");
        let denied = Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false", "--no-creds"])
            .arg(format!("docker://{}/team/busybox:v1", registry.addr()))
            .output()
            .unwrap();
        assert!(!denied.status.success(), "anonymous read was allowed");
    }
}
