//! TLS for the gateway's listener: rustls (ring), TLS 1.2 and 1.3 only,
//! ALPN h2 and http/1.1, certificates from PEM files.

use std::path::Path;
use std::sync::Arc;

use crate::config::TlsConfig;

/// The rustls server settings for `certificates` (the first one for now).
pub fn server_config(certificates: &[TlsConfig]) -> Result<rustls::ServerConfig, String> {
    let tls = certificates.first().ok_or("no certificate configured")?;
    let certs = read_pem(&tls.cert, |r| {
        rustls_pemfile::certs(r).collect::<Result<Vec<_>, _>>()
    })?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", tls.cert.display()));
    }
    let key = read_pem(&tls.key, rustls_pemfile::private_key)?
        .ok_or_else(|| format!("{}: no private key found", tls.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{}: {e}", tls.key.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn read_pem<T>(
    path: &Path,
    parse: impl FnOnce(&mut dyn std::io::BufRead) -> std::io::Result<T>,
) -> Result<T, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&mut std::io::BufReader::new(file)).map_err(|e| format!("{}: {e}", path.display()))
}
