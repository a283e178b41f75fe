//! Mutual TLS with real handshakes: the client certificate names the caller, the metadata is
//! ignored, and a missing, foreign or expired certificate is refused at the handshake.

mod support;

use lienthong::tls::{ClientTls, DevelopmentCertificates, init_certificates};
use lienthong_proto::v1 as wire;
use std::path::Path;
use support::*;
use tonic::Code;

fn certificates(dir: &Path) -> DevelopmentCertificates {
    let hub = PROVINCE.parse().expect("code");
    init_certificates(dir, &hub, &test_agencies()).expect("development certificates")
}

fn client_tls(made: &DevelopmentCertificates, agency: &str) -> ClientTls {
    let (_, cert_file, key_file) = made
        .agencies
        .iter()
        .find(|(code, _, _)| code.as_str() == agency)
        .expect("a certificate for the agency");
    ClientTls {
        ca_file: made.ca.clone(),
        cert_file: cert_file.clone(),
        key_file: key_file.clone(),
    }
}

/// Signs `params` with the development CA in `dir`, for a new key: (certificate, key) as PEM.
fn sign_with_development_ca(dir: &Path, params: rcgen::CertificateParams) -> (String, String) {
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).expect("CA");
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca-key.pem")).expect("CA key"))
            .expect("CA key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let key = rcgen::KeyPair::generate().expect("key");
    let certificate = params.signed_by(&key, &issuer).expect("sign");
    (certificate.pem(), key.serialize_pem())
}

/// A client certificate signed by the development CA in `dir`, with these SAN URIs and, when
/// `expired`, valid only in 2020.
fn issue(dir: &Path, name: &str, uris: &[String], expired: bool) -> ClientTls {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    for uri in uris {
        params
            .subject_alt_names
            .push(rcgen::SanType::URI(uri.clone().try_into().expect("uri")));
    }
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 12, 31);
    }
    let (certificate, key) = sign_with_development_ca(dir, params);
    let cert_file = dir.join(format!("{name}.pem"));
    let key_file = dir.join(format!("{name}-key.pem"));
    std::fs::write(&cert_file, certificate).expect("write");
    std::fs::write(&key_file, key).expect("write");
    ClientTls {
        ca_file: dir.join("ca.pem"),
        cert_file,
        key_file,
    }
}

fn agency_uri(agency: &str) -> String {
    format!("urn:lienthong:agency:{agency}")
}

async fn tls_hub(name: &str, made: &DevelopmentCertificates) -> TestHub {
    let options = HubOptions {
        tls: Some(made.hub.clone()),
        ..HubOptions::new(TransportKind::Embedded)
    };
    TestHub::start(name, options).await
}

fn https(hub: &TestHub) -> String {
    hub.endpoint.replace("http://", "https://")
}

/// How a call fails when the TLS handshake under it was refused: the connection is gone
/// before any gRPC status, so the client reports a transport failure.
fn refused_at_handshake<T>(answer: &Result<T, Code>) -> bool {
    matches!(
        answer,
        Err(Code::Unavailable | Code::Unknown | Code::Internal)
    )
}

/// What a client gets when it talks to the hub: `Ok` or the gRPC status code.
async fn try_send(
    endpoint: &str,
    metadata_identity: &str,
    tls: Option<&ClientTls>,
    from: &str,
) -> Result<String, Code> {
    let mut client = match lienthong::client::connect_with(endpoint, metadata_identity, tls).await {
        Ok(client) => client,
        Err(_) => return Err(Code::Unavailable),
    };
    client
        .send(wire::SendRequest {
            document: Some(document(from, &[DISTRICT], "qua TLS")),
        })
        .await
        .map(|r| r.into_inner().document_id)
        .map_err(|status| status.code())
}

#[tokio::test]
async fn the_certificate_names_the_caller_and_the_metadata_is_ignored() {
    let dir = tempfile::tempdir().expect("dir");
    let made = certificates(dir.path());
    let hub = tls_hub("tls-identity", &made).await;
    let endpoint = https(&hub);
    let commune = client_tls(&made, COMMUNE);

    let sent = try_send(&endpoint, COMMUNE, Some(&commune), COMMUNE).await;
    assert!(sent.is_ok(), "a valid agency certificate works: {sent:?}");
    // Another agency's certificate cannot send as the commune.
    let spoofed = try_send(
        &endpoint,
        COMMUNE,
        Some(&client_tls(&made, COMMUNE_2)),
        COMMUNE,
    )
    .await;
    assert_eq!(spoofed, Err(Code::PermissionDenied));
    // The metadata claims the district; the certificate says commune, and wins.
    let claimed = try_send(&endpoint, DISTRICT, Some(&commune), DISTRICT).await;
    assert_eq!(claimed, Err(Code::PermissionDenied));
    let as_certified = try_send(&endpoint, DISTRICT, Some(&commune), COMMUNE).await;
    assert!(as_certified.is_ok(), "{as_certified:?}");

    // The district receives over TLS what the commune sent.
    let mut district =
        lienthong::client::connect_with(&endpoint, DISTRICT, Some(&client_tls(&made, DISTRICT)))
            .await
            .expect("connect");
    let mut stream = open_stream(&mut district).await;
    let delivery = next_delivery(&mut stream).await;
    assert_eq!(delivered_document(&delivery).from, COMMUNE);
    ack(&mut district, &delivery).await;

    let (_, ready) = http_get(&hub.options.http_listen, "/readyz").await;
    assert!(ready.contains("authentication: mutual TLS"), "{ready}");
    hub.finish().await;
}

#[tokio::test]
async fn missing_foreign_and_expired_certificates_are_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let made = certificates(dir.path());
    let hub = tls_hub("tls-refused", &made).await;
    let endpoint = https(&hub);

    // No client certificate: only the CA to check the hub.
    let anonymous = tonic::transport::Endpoint::from_shared(endpoint.clone())
        .expect("endpoint")
        .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(std::fs::read(&made.ca).expect("CA")),
        ))
        .expect("tls");
    let refused = match anonymous.connect().await {
        Err(_) => true,
        Ok(channel) => {
            let mut client = wire::document_exchange_client::DocumentExchangeClient::new(channel);
            let mut request = tonic::Request::new(wire::SendRequest {
                document: Some(document(COMMUNE, &[DISTRICT], "anonymous")),
            });
            request
                .metadata_mut()
                .insert("x-lienthong-agency", COMMUNE.parse().expect("metadata"));
            let answer = client.send(request).await.map(|_| ()).map_err(|s| s.code());
            refused_at_handshake(&answer)
        }
    };
    assert!(
        refused,
        "a client without a certificate is refused at the handshake"
    );

    // A certificate from another CA.
    let other = tempfile::tempdir().expect("dir");
    let foreign = certificates(other.path());
    let foreign_tls = ClientTls {
        ca_file: made.ca.clone(),
        ..client_tls(&foreign, COMMUNE)
    };
    let answer = try_send(&endpoint, COMMUNE, Some(&foreign_tls), COMMUNE).await;
    assert!(
        refused_at_handshake(&answer),
        "a certificate from an unknown CA is refused at the handshake: {answer:?}"
    );

    // An expired certificate from the right CA.
    let expired = issue(dir.path(), "expired", &[agency_uri(COMMUNE)], true);
    let answer = try_send(&endpoint, COMMUNE, Some(&expired), COMMUNE).await;
    assert!(
        refused_at_handshake(&answer),
        "an expired certificate is refused at the handshake: {answer:?}"
    );

    // Nothing of the refused attempts was accepted.
    let mut district =
        lienthong::client::connect_with(&endpoint, DISTRICT, Some(&client_tls(&made, DISTRICT)))
            .await
            .expect("connect");
    let mut stream = open_stream(&mut district).await;
    assert_no_delivery(&mut stream, std::time::Duration::from_millis(500)).await;
    hub.finish().await;
}

#[test]
fn the_identity_comes_from_the_san_uri() {
    let dir = tempfile::tempdir().expect("dir");
    let made = certificates(dir.path());
    let (_, cert_file, _) = &made.agencies[0];
    let pem = std::fs::read_to_string(cert_file).expect("pem");
    let der = pem_to_der(&pem);
    let code = lienthong::tls::identity_of_certificate(&der).expect("identity");
    assert_eq!(code, made.agencies[0].0);
    assert!(lienthong::tls::identity_of_certificate(b"not a certificate").is_err());
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
    parsed.contents
}

/// Roles come from `urn:lienthong:role:*` SAN URIs: a ministry certificate with the operator
/// role uses Admin, with the auditor role Audit; without them, neither; an unknown role is
/// refused.
#[tokio::test]
async fn certificate_roles_grant_the_admin_and_audit_surfaces() {
    let dir = tempfile::tempdir().expect("dir");
    let made = certificates(dir.path());
    let hub = tls_hub("tls-roles", &made).await;
    let endpoint = https(&hub);
    let operator = issue(
        dir.path(),
        "ministry-operator",
        &[agency_uri(MINISTRY), "urn:lienthong:role:operator".into()],
        false,
    );
    let auditor = issue(
        dir.path(),
        "ministry-auditor",
        &[agency_uri(MINISTRY), "urn:lienthong:role:auditor".into()],
        false,
    );
    let plain = client_tls(&made, MINISTRY);
    let unknown = issue(
        dir.path(),
        "ministry-king",
        &[agency_uri(MINISTRY), "urn:lienthong:role:king".into()],
        false,
    );

    let list = |tls: ClientTls| {
        let endpoint = endpoint.clone();
        async move {
            lienthong::client::connect_admin_with(&endpoint, MINISTRY, Some(&tls))
                .await
                .expect("connect")
                .list_queues(wire::ListQueuesRequest {})
                .await
                .map(|_| ())
                .map_err(|status| status.code())
        }
    };
    let verify = |tls: ClientTls| {
        let endpoint = endpoint.clone();
        async move {
            lienthong::client::connect_audit_with(&endpoint, MINISTRY, Some(&tls))
                .await
                .expect("connect")
                .verify_ledger(wire::VerifyLedgerRequest::default())
                .await
                .map(|_| ())
                .map_err(|status| status.code())
        }
    };
    assert_eq!(list(operator.clone()).await, Ok(()));
    assert_eq!(verify(operator).await, Err(Code::PermissionDenied));
    assert_eq!(verify(auditor.clone()).await, Ok(()));
    assert_eq!(list(auditor).await, Err(Code::PermissionDenied));
    assert_eq!(list(plain.clone()).await, Err(Code::PermissionDenied));
    assert_eq!(verify(plain).await, Err(Code::PermissionDenied));
    assert_eq!(list(unknown).await, Err(Code::Unauthenticated));
    hub.finish().await;
}

/// What a caller tries, in the authorization matrix.
#[derive(Debug, Clone, Copy)]
enum Action {
    SendAsSelf,
    SendAsCommune,
    Receive,
    Track,
    ReportArrived,
    ListQueues,
    VerifyLedger,
    ListReceiptsOfTheDocument,
}

/// The authorization matrix over real mutual TLS: each identity (by its certificate) against
/// each surface. `Ok` or the gRPC code the hub answers.
#[tokio::test]
async fn the_authorization_matrix_holds_under_mutual_tls() {
    use Action::*;
    let dir = tempfile::tempdir().expect("dir");
    let hub_code = PROVINCE.parse().expect("code");
    let mut identities = test_agencies();
    identities.push(AUDITOR.parse().expect("code"));
    identities.push(STRANGER_CODE.parse().expect("code"));
    let made = init_certificates(dir.path(), &hub_code, &identities).expect("certificates");
    let hub = tls_hub("tls-matrix", &made).await;
    let endpoint = https(&hub);
    let tls = |identity: &str| client_tls(&made, identity);

    let document_id = try_send(&endpoint, COMMUNE, Some(&tls(COMMUNE)), COMMUNE)
        .await
        .expect("the commune sends to the district");

    let attempt = |identity: &'static str, action: Action| {
        let endpoint = endpoint.clone();
        let tls = tls(identity);
        let document_id = document_id.clone();
        async move {
            let code = |status: tonic::Status| status.code();
            match action {
                SendAsSelf => try_send(&endpoint, identity, Some(&tls), identity)
                    .await
                    .map(|_| ()),
                SendAsCommune => try_send(&endpoint, identity, Some(&tls), COMMUNE)
                    .await
                    .map(|_| ()),
                Receive | Track | ReportArrived => {
                    let mut client =
                        lienthong::client::connect_with(&endpoint, identity, Some(&tls))
                            .await
                            .expect("connect");
                    match action {
                        Receive => client
                            .receive(wire::ReceiveRequest {})
                            .await
                            .map(|_| ())
                            .map_err(code),
                        Track => client
                            .track(wire::TrackRequest { document_id })
                            .await
                            .map(|_| ())
                            .map_err(code),
                        _ => client
                            .report_status(wire::StatusReport {
                                document_id,
                                status_code: "01".into(),
                                ..Default::default()
                            })
                            .await
                            .map(|_| ())
                            .map_err(code),
                    }
                }
                ListQueues => {
                    lienthong::client::connect_admin_with(&endpoint, identity, Some(&tls))
                        .await
                        .expect("connect")
                        .list_queues(wire::ListQueuesRequest {})
                        .await
                        .map(|_| ())
                        .map_err(code)
                }
                VerifyLedger | ListReceiptsOfTheDocument => {
                    let mut audit =
                        lienthong::client::connect_audit_with(&endpoint, identity, Some(&tls))
                            .await
                            .expect("connect");
                    if matches!(action, VerifyLedger) {
                        audit
                            .verify_ledger(wire::VerifyLedgerRequest::default())
                            .await
                            .map(|_| ())
                            .map_err(code)
                    } else {
                        audit
                            .list_receipts(wire::ListReceiptsRequest {
                                document_id,
                                ..Default::default()
                            })
                            .await
                            .map(|_| ())
                            .map_err(code)
                    }
                }
            }
        }
    };

    let denied = Err(Code::PermissionDenied);
    let unknown = Err(Code::NotFound);
    let matrix: Vec<(&'static str, Action, Result<(), Code>)> = vec![
        (COMMUNE, SendAsSelf, Ok(())),
        (COMMUNE_2, SendAsCommune, denied),
        (STRANGER_CODE, SendAsSelf, unknown),
        (DISTRICT, Receive, Ok(())),
        (STRANGER_CODE, Receive, unknown),
        (COMMUNE, Track, Ok(())),
        (DISTRICT, Track, Ok(())),
        (COMMUNE_2, Track, denied),
        (AUDITOR, Track, denied),
        (DISTRICT, ReportArrived, Ok(())),
        (COMMUNE, ReportArrived, denied),
        (COMMUNE_2, ReportArrived, denied),
        (PROVINCE, ListQueues, Ok(())),
        (COMMUNE, ListQueues, denied),
        (AUDITOR, ListQueues, denied),
        (AUDITOR, VerifyLedger, Ok(())),
        (PROVINCE, VerifyLedger, denied),
        (COMMUNE, VerifyLedger, denied),
        (AUDITOR, ListReceiptsOfTheDocument, Ok(())),
        (COMMUNE, ListReceiptsOfTheDocument, Ok(())),
        (DISTRICT, ListReceiptsOfTheDocument, Ok(())),
        (COMMUNE_2, ListReceiptsOfTheDocument, denied),
    ];
    let mut wrong = Vec::new();
    for (identity, action, expected) in &matrix {
        let got = attempt(identity, *action).await;
        if got != *expected {
            wrong.push(format!(
                "{identity} {action:?}: expected {expected:?}, got {got:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "authorization matrix:\n{}",
        wrong.join("\n")
    );
    hub.finish().await;
}

/// A new hub certificate (same CA), written over the old files.
fn renew_hub_certificate(dir: &Path, files: &lienthong::tls::TlsFiles) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params.subject_alt_names.push(rcgen::SanType::IpAddress(
        std::net::Ipv4Addr::LOCALHOST.into(),
    ));
    let (certificate, key) = sign_with_development_ca(dir, params);
    // Written aside and renamed, as a renewal tool does, so the hub never reads half a file.
    for (path, text) in [(&files.key_file, key), (&files.cert_file, certificate)] {
        let staged = path.with_extension("new");
        std::fs::write(&staged, text).expect("write");
        std::fs::rename(&staged, path).expect("rename");
    }
}

/// The certificate the hub presents in a fresh handshake (DER).
async fn presented_certificate(address: &str, made: &DevelopmentCertificates) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&made.ca).expect("CA"))
        .expect("root");
    let client = client_tls(made, COMMUNE);
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from_pem_file(&client.cert_file).expect("cert")],
        PrivateKeyDer::from_pem_file(&client.key_file).expect("key"),
    )
    .expect("client auth");
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let tls = connector
        .connect(ServerName::try_from("localhost").expect("name"), stream)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
}

/// A renewed hub certificate is picked up without a restart, and open streams keep going.
#[tokio::test]
async fn a_renewed_certificate_is_used_without_dropping_streams() {
    let dir = tempfile::tempdir().expect("dir");
    let made = certificates(dir.path());
    let hub = tls_hub("tls-reload", &made).await;
    let endpoint = https(&hub);
    let address = hub.endpoint.trim_start_matches("http://").to_owned();
    let before = presented_certificate(&address, &made).await;

    let mut district =
        lienthong::client::connect_with(&endpoint, DISTRICT, Some(&client_tls(&made, DISTRICT)))
            .await
            .expect("connect");
    let mut stream = open_stream(&mut district).await;

    renew_hub_certificate(dir.path(), &made.hub);
    eventually(
        "new handshakes get the renewed certificate",
        std::time::Duration::from_secs(15),
        || {
            let address = address.clone();
            let before = before.clone();
            let made = &made;
            async move { presented_certificate(&address, made).await != before }
        },
    )
    .await;

    let id = try_send(
        &endpoint,
        COMMUNE,
        Some(&client_tls(&made, COMMUNE)),
        COMMUNE,
    )
    .await
    .expect("sent after the renewal");
    let delivery = next_delivery(&mut stream).await;
    assert_eq!(
        delivered_document(&delivery).document_id,
        id,
        "the stream opened before the renewal still delivers"
    );
    ack(&mut district, &delivery).await;

    // A broken renewal is refused and the certificate in use stays.
    let watched = lienthong::tls::ReloadingCertificate::load(&made.hub).expect("load");
    std::fs::write(&made.hub.cert_file, "not a certificate").expect("write");
    assert!(!watched.reload_if_changed());
    hub.finish().await;
}

/// A TLS endpoint in front of the local RabbitMQ (127.0.0.1:5672), presenting the development
/// hub certificate (localhost): RabbitMQ itself, reached over `amqps://`. Returns its port.
async fn tls_proxy_to_rabbitmq(files: &lienthong::tls::TlsFiles) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert_file)
        .expect("cert")
        .collect::<Result<_, _>>()
        .expect("cert");
    let key = PrivateKeyDer::from_pem_file(&files.key_file).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut client) = acceptor.accept(client).await else {
                    return;
                };
                let Ok(mut broker) = tokio::net::TcpStream::connect("127.0.0.1:5672").await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
            });
        }
    });
    port
}

/// `amqps://` with `[transport] amqp_ca_file`: the hub trusts RabbitMQ's certificate through the
/// configured CA and documents flow; without the CA (the system's roots) it never connects.
#[tokio::test]
async fn rabbitmq_over_amqps_with_the_configured_ca() {
    let dir = tempfile::tempdir().expect("dir");
    let made = certificates(dir.path());
    let port = tls_proxy_to_rabbitmq(&made.hub).await;
    let url = format!("amqps://guest:guest@localhost:{port}/%2f");

    let untrusting = HubOptions {
        amqp_url: Some(url.clone()),
        ..HubOptions::new(TransportKind::Amqp)
    };
    let hub = TestHub::start("amqps-untrusted", untrusting).await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (status, body) = http_get(&hub.options.http_listen, "/readyz").await;
    assert_eq!(
        status, 503,
        "RabbitMQ's certificate is not signed by a system root: {body}"
    );
    hub.finish().await;

    let trusting = HubOptions {
        amqp_url: Some(url),
        amqp_ca_file: Some(made.ca.clone()),
        ..HubOptions::new(TransportKind::Amqp)
    };
    let hub = TestHub::start("amqps", trusting).await;
    let mut commune = hub.client(COMMUNE).await;
    let mut district = hub.client(DISTRICT).await;
    let id = send(&mut commune, document(COMMUNE, &[DISTRICT], "qua amqps")).await;
    let mut stream = open_stream(&mut district).await;
    let delivery = next_delivery(&mut stream).await;
    assert_eq!(delivered_document(&delivery).document_id, id);
    ack(&mut district, &delivery).await;
    let (status, _) = http_get(&hub.options.http_listen, "/readyz").await;
    assert_eq!(status, 200);
    hub.finish().await;
}

/// A province hub authenticates to the central hub with a certificate naming the province hub
/// and carrying the `hub` role; the same identity without the role may not act as a hub.
#[tokio::test]
async fn a_province_hub_reaches_the_central_hub_with_its_hub_certificate() {
    use support::federation::{CENTRAL, MINISTRY_HOME_AFFAIRS};
    let dir = tempfile::tempdir().expect("temporary directory");
    let central_code = CENTRAL.parse().expect("code");
    let agencies: Vec<lienthong::agency::AgencyCode> = [MINISTRY_HOME_AFFAIRS, PROVINCE]
        .iter()
        .map(|code| code.parse().expect("code"))
        .collect();
    let made = init_certificates(dir.path(), &central_code, &agencies).expect("certificates");
    let central = TestHub::start(
        "tls-central",
        HubOptions {
            tls: Some(made.hub.clone()),
            hub_code: CENTRAL.into(),
            role: "central",
            agencies: Some(vec![CENTRAL.into(), MINISTRY_HOME_AFFAIRS.into()]),
            extra_toml: format!("[[peer]]\nprovince = \"H53\"\nidentity = \"{PROVINCE}\"\n"),
            ..HubOptions::new(TransportKind::Embedded)
        },
    )
    .await;

    // The province's code without the hub role: an agency certificate, not a hub's.
    let forward = wire::ForwardRequest {
        message_id: "m1".into(),
        recipient: MINISTRY_HOME_AFFAIRS.into(),
        payload: Some(wire::forward_request::Payload::Document(document(
            COMMUNE,
            &[MINISTRY_HOME_AFFAIRS],
            "qua trục",
        ))),
    };
    let mut without_role = lienthong::client::connect_with(
        &https(&central),
        PROVINCE,
        Some(&client_tls(&made, PROVINCE)),
    )
    .await
    .expect("connect");
    let refused = without_role
        .forward(forward.clone())
        .await
        .expect_err("no hub role, no Forward");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().contains("urn:lienthong:role:hub"),
        "{}",
        refused.message()
    );

    // The province hub itself, with its hub certificate, sends a commune's document up.
    let hub_certificate = issue(
        dir.path(),
        "province-hub",
        &[agency_uri(PROVINCE), "urn:lienthong:role:hub".into()],
        false,
    );
    let province = TestHub::start(
        "tls-province",
        HubOptions {
            extra_toml: format!(
                "[uplink]\nhub = \"{CENTRAL}\"\nendpoint = \"{}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                https(&central),
                hub_certificate.ca_file.display(),
                hub_certificate.cert_file.display(),
                hub_certificate.key_file.display()
            ),
            ..HubOptions::new(TransportKind::Embedded)
        },
    )
    .await;
    let mut commune = province.client(COMMUNE).await;
    let id = send(
        &mut commune,
        document(COMMUNE, &[MINISTRY_HOME_AFFAIRS], "qua trục"),
    )
    .await;
    let mut ministry = lienthong::client::connect_with(
        &https(&central),
        MINISTRY_HOME_AFFAIRS,
        Some(&client_tls(&made, MINISTRY_HOME_AFFAIRS)),
    )
    .await
    .expect("connect");
    let mut stream = open_stream(&mut ministry).await;
    let delivery = next_delivery(&mut stream).await;
    assert_eq!(delivered_document(&delivery).document_id, id);
    ack(&mut ministry, &delivery).await;
    province.finish().await;
    central.finish().await;
}
