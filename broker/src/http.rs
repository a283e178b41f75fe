//! The operators' HTTP endpoint on `[server] http_listen`: `/healthz` (the process answers),
//! `/readyz` (it can do its work: transport connected, database open), `/metrics`
//! (Prometheus text format), and the status page: `/` (HTML) over `/api/status` (JSON).
//!
//! The status page shows agency codes, document ids and dead-letter reasons: bind
//! `http_listen` to an address only operators reach.

use crate::hub::{DiskRoom, Hub};
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
        .route("/", get(status_page))
        .route("/api/status", get(status_json::<T>))
        .with_state(hub)
}

/// Dead letters and receipts listed on the status page.
const STATUS_PAGE_ROWS: usize = 20;

async fn status_page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("status_page.html"),
    )
}

async fn status_json<T: Transport>(State(hub): State<Hub<T>>) -> axum::response::Response {
    match status_document(&hub) {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body.to_string(),
        )
            .into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response(),
    }
}

/// What the status page shows, as JSON: the sampled history, each queue at the last sample,
/// the newest dead letters and receipts.
fn status_document<T: Transport>(
    hub: &Hub<T>,
) -> Result<serde_json::Value, crate::store::StoreError> {
    let store = hub.store();
    let (queues, transport_error) = hub.activity().queues();
    let dead_letter_count = store.dead_letter_count();
    let dead_letters: Vec<serde_json::Value> = store
        .newest_dead_letters(STATUS_PAGE_ROWS)?
        .into_iter()
        .map(|(id, dead)| {
            serde_json::json!({
                "id": id,
                "message_id": dead.message_id,
                "recipient": dead.recipient,
                "document_id": dead.document_id,
                "reason": dead.reason,
                "dead_lettered_at_unix_ms": dead.dead_lettered_at_unix_ms,
            })
        })
        .collect();
    let receipts: Vec<serde_json::Value> = store
        .newest_receipts(STATUS_PAGE_ROWS)?
        .into_iter()
        .map(|receipt| {
            serde_json::json!({
                "seq": receipt.seq,
                "kind": crate::receipt::kind_name(&receipt),
                "agency": receipt.agency,
                "document_id": receipt.document_id,
                "at_unix_ms": receipt.at_unix_ms,
                "status_code": receipt.status_code,
            })
        })
        .collect();
    Ok(serde_json::json!({
        "hub": hub.config().hub_code.as_str(),
        "now_unix_ms": crate::hub::now_unix_ms(),
        "transport_connected": hub.transport().is_ready(),
        "transport_error": transport_error,
        "outbox_depth": store.outbox_len(),
        "dead_letter_count": dead_letter_count,
        "samples": hub.activity().samples(),
        "queues": queues,
        "dead_letters": dead_letters,
        "receipts": receipts,
    }))
}

async fn readyz<T: Transport>(State(hub): State<Hub<T>>) -> impl IntoResponse {
    let connected = hub.transport().is_ready();
    let mut body = format!(
        "transport: {}\nstore: open, {} messages in the outbox\ndirectory: {} agencies\n{}\n",
        if connected {
            "connected"
        } else {
            "not connected"
        },
        hub.store().outbox_len(),
        hub.directory().len(),
        if hub.config().tls.is_some() {
            "authentication: mutual TLS"
        } else {
            "warning: no authentication (identity from x-lienthong-agency metadata)"
        },
    );
    // Below the floor the hub refuses new messages but delivers the rest: reported, not a
    // reason to take the hub out of service.
    match hub.disk_room() {
        DiskRoom::BelowFloor { free, floor } => body.push_str(&format!(
            "disk: {} MiB free, below the floor of {} MiB ([storage] min_free_mib): new documents and status reports are refused\n",
            free >> 20,
            floor >> 20
        )),
        DiskRoom::Free(free) => body.push_str(&format!("disk: {} MiB free\n", free >> 20)),
        DiskRoom::Unknown => body.push_str("disk: free space unknown\n"),
    }
    // A province goes on without its central hub, so the uplink is reported, not required.
    if let Some(uplink) = &hub.config().federation.uplink {
        body.push_str(&if hub.uplink_connected() {
            format!("uplink: connected to {}\n", uplink.hub)
        } else {
            format!(
                "uplink: {} unreachable; documents for other provinces and ministries wait\n",
                uplink.hub
            )
        });
    }
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
        disk_free_bytes: hub.store().free_disk_bytes(),
        uplink_connected: hub.uplink_connected(),
    });
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}
