//! Starting and stopping a hub: open the store, start the transport and the outbox publisher,
//! serve gRPC (with health and reflection) until shutdown, or until the database can no longer
//! write, then drain.

use crate::config::{Config, TransportConfig};
use crate::directory::AgencyDirectory;
use crate::grpc::{AdminService, AuditService, ExchangeService};
use crate::hub::Hub;
use crate::store::Store;
use crate::transport::amqp::{AmqpSettings, AmqpTransport};
use crate::transport::embedded::EmbeddedTransport;
use crate::transport::{TopologyNames, Transport};
use anyhow::Context;
use lienthong_proto::v1::admin_server::AdminServer;
use lienthong_proto::v1::audit_server::AuditServer;
use lienthong_proto::v1::document_exchange_server::DocumentExchangeServer;
use std::future::Future;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Room for the gRPC envelope around a document of the largest accepted size.
const MESSAGE_OVERHEAD_BYTES: usize = 64 * 1024;

/// The largest HTTP/2 frame the hub accepts (HTTP/2's default is 16 KiB): a client may send a
/// document of up to this size in one DATA frame instead of one per 16 KiB. Flow control stays
/// at hyper's defaults (1 MiB per stream and per connection), above any frame. Measured in
/// `docs/performance.md`, change 13.
pub const MAX_HTTP2_FRAME_BYTES: u32 = 1 << 20;

/// The sockets a hub serves on, bound by the caller (so that tests can bind port 0 and know
/// the addresses before the hub starts).
#[derive(Debug)]
pub struct Listeners {
    /// gRPC: `DocumentExchange`, `Admin`, health and reflection (`[server] grpc_listen`).
    pub grpc: TcpListener,
    /// HTTP: `/healthz`, `/readyz`, `/metrics` (`[server] http_listen`).
    pub http: TcpListener,
}

impl Listeners {
    /// Binds both addresses of the configuration; the error names the key.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let grpc = TcpListener::bind(config.grpc_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} ([server] grpc_listen)",
                    config.grpc_listen
                )
            })?;
        let http = TcpListener::bind(config.http_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} ([server] http_listen)",
                    config.http_listen
                )
            })?;
        Ok(Listeners { grpc, http })
    }
}

/// Runs a hub on `listeners` until `shutdown` resolves, then stops within the configured grace.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // One TLS crypto provider for every rustls user in the process: ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let directory = AgencyDirectory::load(&config.directory_file)?;
    let store = Store::open_with(
        &config.data_dir,
        &config.hub_code,
        config.checkpoints,
        config.cache_bytes,
    )?;
    // The queues of the agencies served here, and of the hubs this one exchanges with.
    let agencies: Vec<_> = directory
        .codes()
        .cloned()
        .chain(crate::federation::neighbour_queues(&config))
        .collect();
    let names = TopologyNames::new(config.transport.prefix());
    let stop = CancellationToken::new();
    tracing::info!(
        hub = %config.hub_code,
        agencies = agencies.len(),
        transport = ?config.transport,
        data_dir = %config.data_dir.display(),
        waiting_in_outbox = store.outbox_len(),
        "starting hub"
    );
    match &config.transport {
        TransportConfig::Embedded { .. } => {
            let transport = EmbeddedTransport::open(
                &store,
                &names,
                &agencies,
                config.delivery.queue_delivery_limit,
            )?;
            serve(
                config, store, transport, directory, listeners, shutdown, stop,
            )
            .await
        }
        TransportConfig::Amqp { url, ca_file, .. } => {
            let ca_pem = match ca_file {
                Some(path) => Some(std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read [transport] amqp_ca_file {}", path.display())
                })?),
                None => None,
            };
            let settings = AmqpSettings {
                url: url.clone(),
                ca_pem,
                names,
                agencies,
                delivery_limit: config.delivery.queue_delivery_limit,
            };
            let transport = AmqpTransport::start(settings, stop.child_token());
            serve(
                config, store, transport, directory, listeners, shutdown, stop,
            )
            .await
        }
    }
}

async fn serve<T: Transport>(
    config: Config,
    store: Store,
    transport: T,
    directory: AgencyDirectory,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let tls = match &config.tls {
        Some(files) => {
            let (server_config, certificate) = crate::tls::server_config(files)?;
            tokio::spawn(crate::tls::watch_certificate(
                certificate,
                crate::tls::RELOAD_CHECK,
                stop.child_token(),
            ));
            Some(server_config)
        }
        None => {
            tracing::warn!(
                "running without authentication: callers are identified by the `{}` metadata; configure [tls] (mutual TLS) for production",
                crate::grpc::AGENCY_METADATA_KEY
            );
            None
        }
    };
    let grace = config.delivery.shutdown_grace;
    let max_message_bytes = config.limits.max_document_bytes + MESSAGE_OVERHEAD_BYTES;
    let hub = Hub::new(config, store.clone(), transport, directory);
    let publisher = tokio::spawn(crate::publisher::run(hub.clone(), stop.child_token()));
    let dead_letter_keeper =
        tokio::spawn(crate::dead_letters::run(hub.clone(), stop.child_token()));
    let federated = {
        let federation = &hub.config().federation;
        federation.uplink.is_some() || !federation.peers.is_empty()
    };
    let relay = federated.then(|| {
        tokio::spawn(crate::federation::run_relay(
            hub.clone(),
            stop.child_token(),
        ))
    });
    let uplink_hub = hub.clone();
    let uplink_stop = stop.child_token();
    let uplink = tokio::spawn(async move {
        if let Err(error) = crate::federation::run_uplink(uplink_hub, uplink_stop).await {
            tracing::error!(%error, "the uplink to the central hub cannot run");
        }
    });
    let sampler = tokio::spawn(crate::activity::run(
        hub.clone(),
        hub.config().telemetry.sample_interval,
        stop.child_token(),
    ));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<DocumentExchangeServer<ExchangeService<T>>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lienthong_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let exchange =
        DocumentExchangeServer::new(ExchangeService::new(hub.clone(), stop.child_token()))
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);

    let Listeners {
        grpc: listener,
        http: http_listener,
    } = listeners;
    let http_address = http_listener.local_addr()?;
    let http_stop = stop.clone();
    let http_router = crate::http::router(hub.clone());
    let http = tokio::spawn(async move {
        axum::serve(http_listener, http_router)
            .with_graceful_shutdown(async move { http_stop.cancelled().await })
            .await
    });

    let local_address = listener.local_addr()?;
    tracing::info!(grpc = %local_address, http = %http_address, "serving");
    let stop_streams = stop.clone();
    let failed_store = store.clone();
    let router = tonic::transport::Server::builder()
        .max_frame_size(Some(MAX_HTTP2_FRAME_BYTES))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(exchange)
        .add_service(AdminServer::new(AdminService::new(hub.clone())))
        .add_service(AuditServer::new(AuditService::new(hub.clone())));
    let on_shutdown = async move {
        tokio::select! {
            () = shutdown => {
                tracing::info!("shutting down: refusing new requests, closing streams");
            }
            // Nothing can be made durable any more: stop, so that a new start reopens the
            // database from what reached the disk (and the supervisor restarts the hub).
            failure = failed_store.failure() => {
                tracing::error!(%failure, "the database cannot write: stopping the hub");
            }
        }
        health_reporter
            .set_not_serving::<DocumentExchangeServer<ExchangeService<T>>>()
            .await;
        stop_streams.cancel();
    };
    let mut served: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match tls {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
            crate::tls::accept_tls(listener, tls, stop.clone()),
            on_shutdown,
        )),
        None => Box::pin(router.serve_with_incoming_shutdown(
            futures_util::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |accepted| {
                    if let Ok(stream) = &accepted {
                        no_delay(stream);
                    }
                    accepted
                },
            ),
            on_shutdown,
        )),
    };
    // The drain is bounded: once shutdown starts, requests in flight get the grace period, and
    // whatever was not confirmed by then is still in the outbox for the next start.
    let result = tokio::select! {
        result = &mut served => result.context("gRPC server failed"),
        () = async { stop.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "requests still in flight after the grace period; stopping anyway");
            Ok(())
        }
    };
    stop.cancel();
    if tokio::time::timeout(grace, publisher).await.is_err() {
        tracing::warn!(
            ?grace,
            "the outbox publisher did not stop within the grace period"
        );
    }
    let _ = tokio::time::timeout(grace, http).await;
    let _ = tokio::time::timeout(grace, dead_letter_keeper).await;
    let _ = tokio::time::timeout(grace, sampler).await;
    let _ = tokio::time::timeout(grace, uplink).await;
    if let Some(relay) = relay {
        let _ = tokio::time::timeout(grace, relay).await;
    }
    if let Err(failure) = store.durable().await {
        // Dropped, each of sled's trees would try to flush again and log the same error: the
        // failed database is left as it is to the process's exit.
        std::mem::forget(store);
        return Err(failure.into());
    }
    tracing::info!(waiting_in_outbox = store.outbox_len(), "hub stopped");
    result
}

/// Turns off Nagle's algorithm on an accepted connection. gRPC writes a response in several
/// small frames; with Nagle on, the last one waits for the client's delayed ACK, and a `Send`
/// took 40 ms more than its work (the serving sockets are ours, so tonic's own setting does not
/// apply to them).
pub(crate) fn no_delay(stream: &tokio::net::TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY on a connection");
    }
}
