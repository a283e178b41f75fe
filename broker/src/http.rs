//! The operators' HTTP endpoint on `[server] http_listen`: `/healthz` (the process answers),
//! `/readyz` (it can do its work: transport connected, database open) and `/metrics`
//! (Prometheus text format).

use crate::hub::Hub;
use crate::metrics::Snapshot;
use crate::transport::Transport;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// The routes, over a hub.
pub fn router<T: Transport>(hub: Hub<T>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<T>))
        .route("/metrics", get(metrics::<T>))
        .with_state(hub)
}

async fn readyz<T: Transport>(State(hub): State<Hub<T>>) -> impl IntoResponse {
    let connected = hub.transport().is_ready();
    let mut body = format!(
        "transport: {}\nstore: open, {} messages in the outbox\ndirectory: {} agencies\nwarning: no authentication (identity from x-lienthong-agency metadata)\n",
        if connected {
            "connected"
        } else {
            "not connected"
        },
        hub.store().outbox_len(),
        hub.directory().len(),
    );
    let status = if connected {
        body.insert_str(0, "ready\n");
        StatusCode::OK
    } else {
        body.insert_str(0, "not ready\n");
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

async fn metrics<T: Transport>(State(hub): State<Hub<T>>) -> impl IntoResponse {
    let text = hub.metrics().render(Snapshot {
        outbox_depth: hub.store().outbox_len(),
        transport_connected: hub.transport().is_ready(),
        database_bytes: hub.store().size_on_disk(),
    });
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}
