//! TLS to PostgreSQL (docs/DESIGN.md#database-tls): libpq's `sslmode` and `sslrootcert` read
//! from the URL, carried out with rustls. tokio-postgres knows only disable/prefer/require and
//! refuses `sslrootcert`, so both are taken out of the URL here and the rest is its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use diesel::ConnectionError;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use crate::config::ConfigError;

/// libpq's `sslmode`, as turnpike carries it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain text.
    Disable,
    /// TLS when the server offers it (certificate not checked), else plain text. libpq's
    /// default, and turnpike's.
    Prefer,
    /// TLS or no connection; the certificate is checked only when `sslrootcert` is given
    /// (as libpq does).
    Require,
    /// TLS, the certificate signed by a trusted root; its name is not checked.
    VerifyCa,
    /// TLS, the certificate signed by a trusted root and naming the host connected to.
    VerifyFull,
}

/// What the URL asks of TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTls {
    pub mode: SslMode,
    /// `sslrootcert`: a PEM file of trusted roots, or `system` (the Mozilla roots built in).
    pub root: Option<PathBuf>,
}

/// Splits `url` into the URL tokio-postgres reads (without `sslmode`, `sslrootcert`) and its TLS.
pub fn split(url: &str) -> Result<(String, PgTls), ConfigError> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut mode = SslMode::Prefer;
    let mut root = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslmode" => {
                mode = match v {
                    "disable" => SslMode::Disable,
                    // `allow` tries plain text first; turnpike never prefers plain text.
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(ConfigError::new(
                            "database.url",
                            format!(
                                "sslmode={other:?}: expected disable, prefer, require, verify-ca or verify-full"
                            ),
                        ));
                    }
                }
            }
            "sslrootcert" => root = Some(PathBuf::from(percent_decode(v))),
            _ => rest.push(pair),
        }
    }
    let mut out = base.to_string();
    if !rest.is_empty() {
        out.push('?');
        out.push_str(&rest.join("&"));
    }
    Ok((out, PgTls { mode, root }))
}

/// `%XX` escapes of a URL parameter (a path with spaces or `&`).
fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl PgTls {
    /// tokio-postgres's mode: whether TLS is tried, and whether it is required.
    fn driver_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Driver;
        match self.mode {
            SslMode::Disable => Driver::Disable,
            SslMode::Prefer => Driver::Prefer,
            _ => Driver::Require,
        }
    }

    /// What the server's certificate must satisfy.
    fn check(&self) -> Check {
        match (self.mode, &self.root) {
            (SslMode::Disable | SslMode::Prefer, _) | (SslMode::Require, None) => Check::Nothing,
            (SslMode::Require | SslMode::VerifyCa, _) => Check::Chain,
            (SslMode::VerifyFull, _) => Check::ChainAndName,
        }
    }

    /// The rustls client configuration; reads the roots file (once, at pool setup: a bad file
    /// is one error at start).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, ConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let check = self.check();
        let webpki = match check {
            Check::Nothing => None,
            _ => Some(
                WebPkiServerVerifier::builder_with_provider(
                    Arc::new(self.roots()?),
                    provider.clone(),
                )
                .build()
                .map_err(|e| ConfigError::new("database.url", format!("sslrootcert: {e}")))?,
            ),
        };
        let verifier = Arc::new(Verifier {
            webpki,
            names: check == Check::ChainAndName,
            algorithms,
        });
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::new("database.url", e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    fn roots(&self) -> Result<RootCertStore, ConfigError> {
        let mut store = RootCertStore::empty();
        match self.root.as_deref() {
            None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            Some(p) if p == Path::new("system") => {
                store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
            Some(path) => {
                let bad = |why: String| {
                    ConfigError::new(
                        "database.url",
                        format!("sslrootcert {}: {why}", path.display()),
                    )
                };
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| bad(e.to_string()))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(e.to_string()))?;
                let (added, _) = store.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(bad("no certificate in it".into()));
                }
            }
        }
        Ok(store)
    }

    /// Opens one connection as diesel-async's pool asks (the TLS settings already applied).
    pub fn connect(
        &self,
        url: &str,
        config: Arc<ClientConfig>,
    ) -> BoxFuture<'static, Result<diesel_async::AsyncPgConnection, ConnectionError>> {
        let parsed = url.parse::<tokio_postgres::Config>();
        let mode = self.driver_mode();
        async move {
            let mut pg = parsed.map_err(|e| ConnectionError::BadConnection(e.to_string()))?;
            pg.ssl_mode(mode);
            let (client, connection) = pg
                .connect(MakeRustls(config))
                .await
                .map_err(|e| ConnectionError::BadConnection(error_chain(&e)))?;
            diesel_async::AsyncPgConnection::try_from_client_and_connection(client, connection)
                .await
        }
        .boxed()
    }
}

/// An error with its causes ("error performing TLS handshake" alone says nothing).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    ChainAndName,
}

/// The server certificate check: none for `prefer`/`require` without roots (the channel is
/// encrypted, the peer not authenticated: libpq's meaning of those modes); the chain for
/// `verify-ca`, where a certificate for another name passes; chain and name for `verify-full`.
/// Handshake signatures are verified in every mode.
#[derive(Debug)]
struct Verifier {
    /// `None`: the certificate is not checked.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    names: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.names => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// ---- tokio-postgres's TLS traits over tokio-rustls ------------------------------------------

struct MakeRustls(Arc<ClientConfig>);

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Rustls<S>;
    type TlsConnect = RustlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        Ok(RustlsConnect {
            config: self.0.clone(),
            name: ServerName::try_from(domain)?.to_owned(),
        })
    }
}

struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Rustls<S>;
    type Error = std::io::Error;
    type Future = BoxFuture<'static, std::io::Result<Rustls<S>>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        async move { Ok(Rustls(connector.connect(self.name, stream).await?)) }.boxed()
    }
}

struct Rustls<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Rustls<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM without channel binding, as most drivers do; the TLS channel still protects it.
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Rustls<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Rustls<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_url() {
        let (url, tls) =
            split("postgres://u:p@h/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&options=x")
                .unwrap();
        assert_eq!(url, "postgres://u:p@h/db?options=x");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(tls.check(), Check::ChainAndName);

        let (url, tls) = split("postgres://u@h/db").unwrap();
        assert_eq!(url, "postgres://u@h/db");
        assert_eq!(tls.mode, SslMode::Prefer, "libpq's default");
        assert_eq!(tls.check(), Check::Nothing);
    }

    #[test]
    fn require_checks_the_chain_only_with_roots() {
        let (_, plain) = split("postgres://h/db?sslmode=require").unwrap();
        assert_eq!(plain.check(), Check::Nothing);
        let (_, rooted) = split("postgres://h/db?sslmode=require&sslrootcert=ca.pem").unwrap();
        assert_eq!(rooted.check(), Check::Chain);
        let (_, ca) = split("postgres://h/db?sslmode=verify-ca").unwrap();
        assert_eq!(ca.check(), Check::Chain);
        assert_eq!(ca.driver_mode(), tokio_postgres::config::SslMode::Require);
        let (_, off) = split("postgres://h/db?sslmode=disable").unwrap();
        assert_eq!(off.driver_mode(), tokio_postgres::config::SslMode::Disable);
    }

    #[test]
    fn an_unknown_sslmode_names_the_choices() {
        let e = split("postgres://h/db?sslmode=maybe")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("database.url") && e.contains("verify-full"),
            "{e}"
        );
    }

    #[test]
    fn a_roots_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let url = format!(
            "postgres://h/db?sslmode=verify-ca&sslrootcert={}",
            path.display()
        );
        let (_, tls) = split(&url).unwrap();
        let e = tls.client_config().unwrap_err().to_string();
        assert!(
            e.contains("sslrootcert") && e.contains("no certificate"),
            "{e}"
        );
        let missing = split("postgres://h/db?sslmode=verify-ca&sslrootcert=/nonexistent.pem")
            .unwrap()
            .1
            .client_config()
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent.pem"), "{missing}");
    }
}
