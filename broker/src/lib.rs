//! lienthong: a hub for the exchange of official documents between government agencies.
//!
//! # Layout
//! - [`agency`], [`directory`]: agency codes and the directory of agencies the hub serves.
//! - [`document`], [`status`], [`receipt`]: the domain — validated documents, status codes,
//!   receipts and the delivery state they add up to.
//! - [`store`]: durable custody in sled — documents, the outbox, receipts, settled deliveries.
//! - [`transport`]: how messages reach recipients — RabbitMQ ([`transport::amqp`]) or queues
//!   embedded in sled ([`transport::embedded`]).
//! - [`hub`]: the use cases (send, receive, ack, report status, track).
//! - [`publisher`]: moves the outbox to the transport; [`dead_letters`] keeps what the
//!   transport dead-lettered.
//! - [`admin`]: the operators' use cases (queues, dead letters, replay).
//! - [`federation`]: province and central hubs — routes between hubs, `Forward`, the receipt
//!   relay, and the uplink connector's side of a province hub.
//! - [`grpc`], [`server`]: the gRPC service and the server that runs it all.
//! - [`http`], [`metrics`]: `/healthz`, `/readyz` and Prometheus `/metrics` for operators.
//! - [`client`], [`cli`]: the client side, for people and tests.
//! - [`config`], [`error`]: configuration and the errors callers see.

pub mod activity;
pub mod admin;
pub mod agency;
pub mod audit;
pub mod cli;
pub mod client;
pub mod config;
pub mod dead_letters;
pub mod directory;
pub mod document;
pub mod error;
pub mod federation;
pub mod grpc;
pub mod http;
pub mod hub;
pub mod identity;
pub mod ledger;
pub mod metrics;
pub mod publisher;
pub mod receipt;
pub mod server;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod transport;
