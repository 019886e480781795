//! HTTP/JSON front end (placeholder; being written).

/// Placeholder until the HTTP front end lands.
pub async fn serve(
    _listener: tokio::net::TcpListener,
    _node: crate::Node,
    _config: std::sync::Arc<crate::ServerConfig>,
    mut shutdown: crate::shutdown::Shutdown,
) -> std::io::Result<()> {
    shutdown.fired().await;
    Ok(())
}
