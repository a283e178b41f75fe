//! Mutual TLS: the gRPC server's configuration (`[tls]`), the caller's identity read from its
//! client certificate, the client side, and development certificates (`lienthong certs init`).
//!
//! Identity: a SAN URI `urn:lienthong:agency:<code>`, or failing that a subject CN that is an
//! agency code. When the connection carries a client certificate, it alone names the caller;
//! the `x-lienthong-agency` metadata is ignored. The server requires a client certificate
//! signed by `client_ca_file` whenever TLS is on. The hub's own certificate and key are reloaded
//! when their files change (checked every [`RELOAD_CHECK`]), so a renewal drops no stream.

use crate::agency::AgencyCode;
use crate::identity::{Caller, ROLE_URI_PREFIX, Role};
use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The URI prefix of an agency identity in a certificate's subject alternative names.
pub const AGENCY_URI_PREFIX: &str = "urn:lienthong:agency:";

/// `[tls]`: the hub's certificate and key, and the CA that signs its clients' certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: PathBuf,
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

/// How often the hub looks at its certificate and key files for a renewal.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// The hub's certificate, replaced in place when its files change: new handshakes use the new
/// one, connections and streams already open go on.
#[derive(Debug)]
pub struct ReloadingCertificate {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
    /// (modified time, length) of the certificate and key files when last loaded.
    seen: Mutex<Option<(FileStamp, FileStamp)>>,
}

type FileStamp = (Option<std::time::SystemTime>, u64);

fn stamp(path: &Path) -> FileStamp {
    std::fs::metadata(path).map_or((None, 0), |m| (m.modified().ok(), m.len()))
}

impl ReloadingCertificate {
    pub fn load(files: &TlsFiles) -> anyhow::Result<Arc<ReloadingCertificate>> {
        let stamps = (stamp(&files.cert_file), stamp(&files.key_file));
        let key = certified_key(files)?;
        Ok(Arc::new(ReloadingCertificate {
            files: files.clone(),
            current: RwLock::new(key),
            seen: Mutex::new(Some(stamps)),
        }))
    }

    /// Loads the files again if they changed; a bad renewal is logged and the old certificate
    /// kept. Returns whether a new certificate is in use.
    pub fn reload_if_changed(&self) -> bool {
        let stamps = (stamp(&self.files.cert_file), stamp(&self.files.key_file));
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.as_ref() == Some(&stamps) {
            return false;
        }
        *seen = Some(stamps);
        match certified_key(&self.files) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = key;
                tracing::info!(cert = %self.files.cert_file.display(), "TLS certificate reloaded");
                true
            }
            Err(error) => {
                tracing::error!(%error, "the renewed TLS certificate is not usable; keeping the current one");
                false
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

fn certified_key(files: &TlsFiles) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert_file)
        .with_context(|| format!("cannot read [tls] cert_file {}", files.cert_file.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("[tls] cert_file {}", files.cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .with_context(|| format!("cannot read [tls] key_file {}", files.key_file.display()))?;
    if chain.is_empty() {
        anyhow::bail!(
            "[tls] cert_file {} holds no certificate",
            files.cert_file.display()
        );
    }
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .context("[tls] key_file: not a supported private key")?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified
        .keys_match()
        .context("[tls] key_file does not belong to cert_file")?;
    Ok(Arc::new(certified))
}

/// The server side: TLS 1.2/1.3 with rustls and the ring provider, a client certificate signed
/// by `client_ca_file` required, HTTP/2 by ALPN, and the hub's certificate reloaded on change.
pub fn server_config(
    files: &TlsFiles,
) -> anyhow::Result<(Arc<rustls::ServerConfig>, Arc<ReloadingCertificate>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(&files.client_ca_file).with_context(|| {
        format!(
            "cannot read [tls] client_ca_file {}",
            files.client_ca_file.display()
        )
    })? {
        roots
            .add(certificate.context("[tls] client_ca_file")?)
            .context("[tls] client_ca_file: not a usable CA certificate")?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .context("[tls] client_ca_file")?;
    let certificate = ReloadingCertificate::load(files)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certificate.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(config), certificate))
}

/// TLS connections from `listener`, handshakes done off the accept loop; failed handshakes
/// (no certificate, unknown CA, expired) are logged and dropped. Stops when `stop` fires.
pub fn accept_tls(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<
    std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
> {
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accepting a connection failed");
                        continue;
                    }
                },
                () = stop.cancelled() => return,
            };
            crate::server::no_delay(&stream);
            let acceptor = acceptor.clone();
            let sender = sender.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = sender.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(target: "lienthong::security", %peer, %error, "TLS handshake refused");
                    }
                    Err(_) => {
                        tracing::warn!(target: "lienthong::security", %peer, "TLS handshake timed out")
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

/// Longest a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reloads the hub's certificate whenever its files change, until `stop`.
pub async fn watch_certificate(
    certificate: Arc<ReloadingCertificate>,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        certificate.reload_if_changed();
    }
}

/// A client's certificate, key and the CA that signed the hub's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The client side of mutual TLS.
pub fn client_config(tls: &ClientTls) -> anyhow::Result<ClientTlsConfig> {
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&tls.ca_file, "the CA file")?))
        .identity(Identity::from_pem(
            read(&tls.cert_file, "the certificate")?,
            read(&tls.key_file, "the key")?,
        )))
}

/// The caller a client certificate (DER) names: its agency and roles.
pub fn caller_of_certificate(der: &[u8]) -> Result<Caller, String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let mut agency = None;
    let mut roles = Vec::new();
    if let Ok(Some(names)) = certificate.subject_alternative_name() {
        for name in &names.value.general_names {
            let x509_parser::extensions::GeneralName::URI(uri) = name else {
                continue;
            };
            if let Some(code) = uri.strip_prefix(AGENCY_URI_PREFIX) {
                let code: AgencyCode = code
                    .parse()
                    .map_err(|e| format!("certificate SAN {uri}: {e}"))?;
                agency.get_or_insert(code);
            } else if let Some(role) = uri.strip_prefix(ROLE_URI_PREFIX) {
                let role: Role = role
                    .parse()
                    .map_err(|e| format!("certificate SAN {uri}: {e}"))?;
                roles.push(role);
            }
        }
    }
    let agency = match agency {
        Some(agency) => agency,
        None => common_name_agency(&certificate)?,
    };
    Ok(Caller { agency, roles })
}

/// The agency a client certificate (DER) names.
pub fn identity_of_certificate(der: &[u8]) -> Result<AgencyCode, String> {
    caller_of_certificate(der).map(|caller| caller.agency)
}

fn common_name_agency(
    certificate: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<AgencyCode, String> {
    let common_name = certificate
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or(
            "the client certificate names no agency (no SAN URI urn:lienthong:agency:…, no CN)",
        )?;
    common_name
        .parse()
        .map_err(|e| format!("certificate CN `{common_name}` is not an agency code: {e}"))
}

/// Files written by [`init_certificates`].
#[derive(Debug, Clone)]
pub struct DevelopmentCertificates {
    pub ca: PathBuf,
    pub hub: TlsFiles,
    /// Per agency: (code, certificate, key).
    pub agencies: Vec<(AgencyCode, PathBuf, PathBuf)>,
}

/// Makes a development CA, a hub certificate (for `localhost` and 127.0.0.1, naming the hub's
/// code with the `hub` role, so that it also authenticates the hub to a central hub) and one
/// client certificate per agency, as PEM files in `dir`. Keys are written 0600. The files, `dir`
/// and the directories created for it are synced before this returns: a power cut after it
/// leaves every file whole.
pub fn init_certificates(
    dir: &Path,
    hub_code: &AgencyCode,
    agencies: &[AgencyCode],
) -> anyhow::Result<DevelopmentCertificates> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    crate::store::create_directory_durably(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, text: &str, private: bool| -> anyhow::Result<PathBuf> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()
            .with_context(|| format!("cannot sync {}", path.display()))?;
        Ok(path)
    };

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "lienthong development CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let ca_path = write("ca.pem", &ca.pem(), false)?;
    write("ca-key.pem", &ca_key.serialize_pem(), true)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let leaf = |code: &AgencyCode, server: bool| -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut names = Vec::new();
        if server {
            names.push("localhost".to_owned());
        }
        let mut params = CertificateParams::new(names)?;
        if server {
            params
                .subject_alt_names
                .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        }
        params.subject_alt_names.push(SanType::URI(
            format!("{AGENCY_URI_PREFIX}{code}").try_into()?,
        ));
        if server {
            // The hub's certificate is also its client certificate towards the central hub.
            params
                .subject_alt_names
                .push(SanType::URI(format!("{ROLE_URI_PREFIX}hub").try_into()?));
        }
        params
            .distinguished_name
            .push(DnType::CommonName, code.as_str());
        let certificate = params.signed_by(&key, &issuer)?;
        Ok((certificate.pem(), key.serialize_pem()))
    };
    let (hub_pem, hub_key) = leaf(hub_code, true)?;
    let hub = TlsFiles {
        cert_file: write("hub.pem", &hub_pem, false)?,
        key_file: write("hub-key.pem", &hub_key, true)?,
        client_ca_file: ca_path.clone(),
    };
    let mut issued = Vec::with_capacity(agencies.len());
    for code in agencies {
        let (pem, key) = leaf(code, false)?;
        issued.push((
            code.clone(),
            write(&format!("{code}.pem"), &pem, false)?,
            write(&format!("{code}-key.pem"), &key, true)?,
        ));
    }
    crate::store::sync_directory(dir).with_context(|| format!("cannot sync {}", dir.display()))?;
    Ok(DevelopmentCertificates {
        ca: ca_path,
        hub,
        agencies: issued,
    })
}
