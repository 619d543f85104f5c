//! Stopping on request: SIGINT (Ctrl-C) or SIGTERM (what Kubernetes and systemd send).

/// Resolves on the first SIGINT or SIGTERM after the call, naming it ("interrupted",
/// "terminated"). Create it once and keep it: a signal that arrives while no such future
/// exists is not seen. Never resolves where the signals cannot be listened to.
pub async fn stop_requested() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "interrupted",
            _ = term.recv() => "terminated",
        },
        _ => std::future::pending().await,
    }
}
