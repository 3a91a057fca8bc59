//! Where a credential may travel: over TLS with verified certificates, or to this
//! machine's loopback (an emulator), where it does not travel at all. The one check
//! behind every provider and registry that sends a key, a token or a password
//! (Service Bus, Event Grid, the HTTP schema registry), made before anything is sent.

/// Whether `host` (a name or an address, with or without a port, IPv6 in brackets or
/// not) is this machine: `localhost`, `127.0.0.0/8` or `::1`.
///
/// ```
/// use cloudbus_driver::transport::is_loopback_host;
/// assert!(is_loopback_host("127.0.0.1:5672"));
/// assert!(is_loopback_host("[::1]:8080"));
/// assert!(is_loopback_host("localhost"));
/// assert!(!is_loopback_host("contoso.servicebus.windows.net"));
/// assert!(!is_loopback_host("10.0.0.4:5672"));
/// ```
pub fn is_loopback_host(host: &str) -> bool {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        }),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether a credential may be sent to `url`: over `https://` when the client checks
/// the server's certificate (`certificates_verified`), else only to this machine's
/// loopback (plain `http://` to an emulator, or TLS without checks to one).
///
/// ```
/// use cloudbus_driver::transport::credentials_may_go_to;
/// let url = |s: &str| url::Url::parse(s).unwrap();
/// assert!(credentials_may_go_to(&url("https://registry.example.com"), true));
/// assert!(credentials_may_go_to(&url("http://127.0.0.1:8081"), true));
/// assert!(!credentials_may_go_to(&url("http://registry.example.com"), true));
/// // TLS without certificate checks proves nothing about a remote host.
/// assert!(!credentials_may_go_to(&url("https://registry.example.com"), false));
/// assert!(credentials_may_go_to(&url("https://localhost:5673"), false));
/// ```
pub fn credentials_may_go_to(url: &url::Url, certificates_verified: bool) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    match url.scheme() {
        "https" if certificates_verified => true,
        "https" | "http" => is_loopback_host(host),
        _ => false,
    }
}
