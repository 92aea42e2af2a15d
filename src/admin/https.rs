//! The admin API over HTTPS: accept, the TLS handshake (bounded by
//! `ssl_handshake_timeout`, plaintext refused, see [`crate::tls`]), then hyper's
//! HTTP/1.1 on the TLS stream with the same router as plain HTTP. Handlers get
//! the peer address as axum's `ConnectInfo`, as they do on plain HTTP.

use crate::tls::ServerTls;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Serve `app` on `listener` with TLS until the runtime stops.
pub async fn serve(listener: TcpListener, tls: Arc<ServerTls>, app: Router, timeout: Duration) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::error!(error = %e, "admin HTTPS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (tls, app) = (Arc::clone(&tls), app.clone());
        tokio::spawn(async move {
            let stream = match crate::tls::accept(&tls, stream, timeout).await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(%peer, "admin HTTPS connection refused: {e}");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                let mut app = app.clone();
                tower_service::Service::call(&mut app, req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "admin HTTPS connection ended");
            }
        });
    }
}
