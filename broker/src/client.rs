//! A client of a hub's `DocumentExchange`, identified as one agency: used by the CLI, the
//! connectors and the tests.

use crate::grpc::AGENCY_METADATA_KEY;
use crate::tls::ClientTls;
use lienthong_proto::v1::document_exchange_client::DocumentExchangeClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Largest message the client sends or accepts; above any hub's document limit.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Adds the caller's agency code to every request.
#[derive(Debug, Clone)]
pub struct AgencyIdentity(AsciiMetadataValue);

impl Interceptor for AgencyIdentity {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(AGENCY_METADATA_KEY, self.0.clone());
        Ok(request)
    }
}

/// A `DocumentExchange` client speaking as one agency.
pub type ExchangeClient = DocumentExchangeClient<InterceptedService<Channel, AgencyIdentity>>;

/// An `Admin` client speaking as one operator identity.
pub type AdminClient =
    lienthong_proto::v1::admin_client::AdminClient<InterceptedService<Channel, AgencyIdentity>>;

/// Connects to `endpoint` (`http://host:port`) as `agency`, without TLS.
pub async fn connect(endpoint: &str, agency: &str) -> anyhow::Result<ExchangeClient> {
    connect_with(endpoint, agency, None).await
}

/// Connects to `endpoint` as `agency`; with `tls`, over mutual TLS (`https://host:port`), where
/// the client certificate, not the metadata, names the caller.
pub async fn connect_with(
    endpoint: &str,
    agency: &str,
    tls: Option<&ClientTls>,
) -> anyhow::Result<ExchangeClient> {
    let (channel, identity) = open_channel(endpoint, agency, tls).await?;
    Ok(DocumentExchangeClient::with_interceptor(channel, identity)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Connects to the `Admin` service at `endpoint` as the operator identity `agency`.
pub async fn connect_admin(endpoint: &str, agency: &str) -> anyhow::Result<AdminClient> {
    connect_admin_with(endpoint, agency, None).await
}

pub async fn connect_admin_with(
    endpoint: &str,
    agency: &str,
    tls: Option<&ClientTls>,
) -> anyhow::Result<AdminClient> {
    let (channel, identity) = open_channel(endpoint, agency, tls).await?;
    Ok(lienthong_proto::v1::admin_client::AdminClient::with_interceptor(channel, identity))
}

async fn open_channel(
    endpoint: &str,
    agency: &str,
    tls: Option<&ClientTls>,
) -> anyhow::Result<(Channel, AgencyIdentity)> {
    let identity = AsciiMetadataValue::try_from(agency)
        .map_err(|_| anyhow::anyhow!("agency code `{agency}` is not valid metadata"))?;
    let mut target = Endpoint::from_shared(endpoint.to_owned())?;
    if let Some(tls) = tls {
        target = target.tls_config(crate::tls::client_config(tls)?)?;
    }
    let channel = target
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to the hub at {endpoint}: {e}"))?;
    Ok((channel, AgencyIdentity(identity)))
}

/// An `Audit` client speaking as one identity (an auditor, or an agency about its documents).
pub type AuditClient =
    lienthong_proto::v1::audit_client::AuditClient<InterceptedService<Channel, AgencyIdentity>>;

/// Connects to the `Audit` service at `endpoint` as `agency`.
pub async fn connect_audit(endpoint: &str, agency: &str) -> anyhow::Result<AuditClient> {
    connect_audit_with(endpoint, agency, None).await
}

pub async fn connect_audit_with(
    endpoint: &str,
    agency: &str,
    tls: Option<&ClientTls>,
) -> anyhow::Result<AuditClient> {
    let (channel, identity) = open_channel(endpoint, agency, tls).await?;
    Ok(lienthong_proto::v1::audit_client::AuditClient::with_interceptor(channel, identity))
}
