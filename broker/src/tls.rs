//! Mutual TLS: the gRPC server's configuration (`[tls]`), the caller's identity read from its
//! client certificate, the client side, and development certificates (`lienthong certs init`).
//!
//! Identity: a SAN URI `urn:lienthong:agency:<code>`, or failing that a subject CN that is an
//! agency code. When the connection carries a client certificate, it alone names the caller;
//! the `x-lienthong-agency` metadata is ignored. The server requires a client certificate
//! signed by `client_ca_file` whenever TLS is on.

use crate::agency::AgencyCode;
use crate::identity::{Caller, ROLE_URI_PREFIX, Role};
use anyhow::Context;
use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

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

/// The server side: TLS 1.2/1.3 (rustls, ring) with a required client certificate.
pub fn server_config(files: &TlsFiles) -> anyhow::Result<ServerTlsConfig> {
    let identity = Identity::from_pem(
        read(&files.cert_file, "[tls] cert_file")?,
        read(&files.key_file, "[tls] key_file")?,
    );
    Ok(ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(Certificate::from_pem(read(
            &files.client_ca_file,
            "[tls] client_ca_file",
        )?))
        .client_auth_optional(false))
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
/// code) and one client certificate per agency, as PEM files in `dir`. Keys are written 0600.
pub fn init_certificates(
    dir: &Path,
    hub_code: &AgencyCode,
    agencies: &[AgencyCode],
) -> anyhow::Result<DevelopmentCertificates> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
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
    Ok(DevelopmentCertificates {
        ca: ca_path,
        hub,
        agencies: issued,
    })
}
