//! The Service Bus management API (ATOM entries over HTTPS, the API that the Azure
//! SDKs' `ServiceBusAdministrationClient` calls): create, update and delete queues,
//! topics, subscriptions and rules, signed with a SAS token or carrying an identity's
//! bearer token.

use std::time::Duration;

use chrono::Utc;
use cloudbus_driver::{Error, ErrorKind, Result, SubscriptionState};

use super::config::{Access, ServiceBusConfig, TOKEN_SCOPE};
use super::rules::RuleFilter;
use crate::auth::{Secret, service_bus_sas_token};
use crate::error::kind_of_status;

const ATOM: &str = "http://www.w3.org/2005/Atom";
const SB: &str = "http://schemas.microsoft.com/netservices/2010/10/servicebus/connect";
const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";
const API_VERSION: &str = "2021-05";
/// How long a management SAS token lives.
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// The properties cloudbus sets on a queue or subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EntityProperties {
    /// Peek-lock duration (5 s to 5 min).
    pub lock: Duration,
    /// Deliveries before the service dead-letters with `MaxDeliveryCountExceeded`.
    pub max_delivery_count: u32,
    /// Session-enabled.
    pub requires_session: bool,
}

/// The management client of one namespace.
pub(crate) struct Admin {
    http: reqwest::Client,
    endpoint: String,
    access: Access,
}

impl Admin {
    pub(crate) fn new(config: &ServiceBusConfig) -> Result<Self> {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if config.emulator {
            // The emulators serve the management API with a self-signed certificate;
            // only a connection string with UseDevelopmentEmulator=true gets here.
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        let on_this_machine = url::Url::parse(&config.management_endpoint)
            .ok()
            .and_then(|u| {
                u.host_str()
                    .map(cloudbus_driver::transport::is_loopback_host)
            })
            .unwrap_or(false);
        if on_this_machine {
            // Reached directly: an HTTP(S)_PROXY from the environment would carry the
            // token off this machine, over a connection whose certificate may not be
            // checked.
            builder = builder.no_proxy();
        }
        let http = builder.build().map_err(|e| {
            Error::with_source(ErrorKind::Internal, "cannot build the HTTP client", e)
        })?;
        Ok(Admin {
            http,
            endpoint: config.management_endpoint.trim_end_matches('/').to_owned(),
            access: config.access.clone(),
        })
    }

    /// The Authorization header for a request to `url`.
    async fn authorization(&self, url: &str) -> Result<Secret> {
        match &self.access {
            Access::Key { name, key } => {
                let expiry = Utc::now().timestamp() + TOKEN_LIFETIME.as_secs() as i64;
                service_bus_sas_token(url, name, key, expiry)
            }
            Access::SasToken(token) => Ok(token.clone()),
            Access::Identity(credential) => {
                let token = credential
                    .get_token(&[TOKEN_SCOPE], None)
                    .await
                    .map_err(|e| {
                        Error::with_source(
                            ErrorKind::PermissionDenied,
                            format!("no token for {TOKEN_SCOPE} from the token credential"),
                            e,
                        )
                    })?;
                Ok(Secret::new(format!("Bearer {}", token.token.secret())))
            }
        }
    }

    fn url(&self, path: &str) -> String {
        let encoded: Vec<String> = path
            .split('/')
            .map(|p| percent_encoding::utf8_percent_encode(p, PATH_ENCODE).to_string())
            .collect();
        format!(
            "{}/{}?api-version={API_VERSION}",
            self.endpoint,
            encoded.join("/")
        )
    }

    /// Sends one request; answers the status and the body when the status is a
    /// success, 404 or 409.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
        update: bool,
    ) -> Result<(u16, String)> {
        let url = self.url(path);
        let token = self
            .authorization(&format!("{}/{}", self.endpoint, path))
            .await?;
        let mut request = self
            .http
            .request(method.clone(), &url)
            .header("authorization", token.expose());
        if let Some(body) = body {
            request = request
                .header(
                    "content-type",
                    "application/atom+xml;type=entry;charset=utf-8",
                )
                .body(body);
        }
        if update {
            request = request.header("if-match", "*");
        }
        let response = request.send().await.map_err(|e| {
            let kind = if e.is_timeout() {
                ErrorKind::Timeout
            } else {
                ErrorKind::Unavailable
            };
            // reqwest's error names the URL, never the authorization header.
            Error::with_source(kind, format!("{method} {path} on {}", self.endpoint), e)
        })?;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        if (200..300).contains(&status) || status == 404 || status == 409 {
            return Ok((status, text));
        }
        let detail = between(&text, "<Detail>", "</Detail>")
            .unwrap_or(&text)
            .chars()
            .take(512)
            .collect::<String>();
        Err(Error::new(
            kind_of_status(status),
            format!("{method} {path}: HTTP {status}: {detail}"),
        ))
    }

    /// Creates `path` with `description`, or updates it when it exists.
    async fn put(&self, path: &str, description: String) -> Result<()> {
        let status = match self
            .call(reqwest::Method::PUT, path, Some(description.clone()), false)
            .await?
            .0
        {
            409 => {
                self.call(reqwest::Method::PUT, path, Some(description), true)
                    .await?
                    .0
            }
            status => status,
        };
        match status {
            404 => Err(not_found(path)),
            409 => Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{path} exists and cannot be updated"),
            )),
            _ => Ok(()),
        }
    }

    /// The description (an Atom entry) of `path`; `None` when it does not exist.
    pub(crate) async fn description(&self, path: &str) -> Result<Option<String>> {
        let (status, text) = self.call(reqwest::Method::GET, path, None, false).await?;
        Ok((status != 404).then_some(text))
    }

    /// The settings of subscription `name` of `topic` (its lock, delivery limit and
    /// the filter of cloudbus's rule); `None` when there is no such subscription.
    pub(crate) async fn subscription_state(
        &self,
        topic: &str,
        name: &str,
    ) -> Result<Option<SubscriptionState>> {
        let path = format!("{topic}/Subscriptions/{name}");
        let Some(description) = self.description(&path).await? else {
            return Ok(None);
        };
        let mut state = entity_state(&description);
        state.filter = Some(
            match self
                .description(&format!("{path}/Rules/{RULE_NAME}"))
                .await?
            {
                Some(rule) => rule_text_of_description(&rule),
                None => "no cloudbus rule".to_owned(),
            },
        );
        Ok(Some(state))
    }

    /// Whether `path` exists.
    pub(crate) async fn exists(&self, path: &str) -> Result<bool> {
        Ok(self.call(reqwest::Method::GET, path, None, false).await?.0 != 404)
    }

    /// The names a queue admits as subscriptions (kept in its `UserMetadata`);
    /// `None` when the queue does not exist.
    pub(crate) async fn admitted(&self, queue: &str) -> Result<Option<Vec<String>>> {
        let (status, text) = self.call(reqwest::Method::GET, queue, None, false).await?;
        if status == 404 {
            return Ok(None);
        }
        Ok(Some(admitted_of(&text)))
    }

    /// The messages of `path` (a queue, or `topic/Subscriptions/name`) still in it:
    /// `ActiveMessageCount` of its `CountDetails` (dead letters and scheduled messages
    /// are counted apart and not included). `None` when the entity does not exist or
    /// the answer has no count.
    pub(crate) async fn active_message_count(&self, path: &str) -> Result<Option<u64>> {
        let (status, text) = self.call(reqwest::Method::GET, path, None, false).await?;
        if status == 404 {
            return Ok(None);
        }
        Ok(parse_active_message_count(&text))
    }

    /// Deletes `path`; a missing one is fine.
    pub(crate) async fn delete(&self, path: &str) -> Result<()> {
        self.call(reqwest::Method::DELETE, path, None, false)
            .await
            .map(|_| ())
    }

    /// Creates a queue or updates its properties, admitting `admitted` as the names
    /// of its subscriptions.
    pub(crate) async fn put_queue(
        &self,
        queue: &str,
        props: &EntityProperties,
        admitted: &[String],
    ) -> Result<()> {
        let fields = format!(
            "<LockDuration>{}</LockDuration>\
             <RequiresDuplicateDetection>true</RequiresDuplicateDetection>\
             <RequiresSession>{}</RequiresSession>\
             <DuplicateDetectionHistoryTimeWindow>PT10M</DuplicateDetectionHistoryTimeWindow>\
             <MaxDeliveryCount>{}</MaxDeliveryCount>\
             <UserMetadata>{}</UserMetadata>",
            iso_duration(props.lock),
            props.requires_session,
            props.max_delivery_count,
            xml_escape(&format!("{ADMITTED_PREFIX}{}", admitted.join(",")))
        );
        self.put(queue, entry("QueueDescription", &fields)).await
    }

    /// Creates a topic (with duplicate detection) unless it exists.
    pub(crate) async fn ensure_topic(&self, topic: &str) -> Result<()> {
        let fields = "<RequiresDuplicateDetection>true</RequiresDuplicateDetection>\
                      <DuplicateDetectionHistoryTimeWindow>PT10M</DuplicateDetectionHistoryTimeWindow>";
        match self
            .call(
                reqwest::Method::PUT,
                topic,
                Some(entry("TopicDescription", fields)),
                false,
            )
            .await?
            .0
        {
            404 => Err(not_found(topic)),
            _ => Ok(()),
        }
    }

    /// Creates the queue `queue` unless it exists, with `props`.
    pub(crate) async fn ensure_queue(&self, queue: &str, props: &EntityProperties) -> Result<()> {
        if self.exists(queue).await? {
            return Ok(());
        }
        self.put_queue(queue, props, &[]).await
    }

    /// Creates or updates subscription `name` of `topic` and sets its one rule.
    pub(crate) async fn put_subscription(
        &self,
        topic: &str,
        name: &str,
        props: &EntityProperties,
        rule: &RuleFilter,
    ) -> Result<()> {
        if !self.exists(topic).await? {
            return Err(not_found(topic));
        }
        let path = format!("{topic}/Subscriptions/{name}");
        let fields = format!(
            "<LockDuration>{}</LockDuration>\
             <RequiresSession>{}</RequiresSession>\
             <MaxDeliveryCount>{}</MaxDeliveryCount>",
            iso_duration(props.lock),
            props.requires_session,
            props.max_delivery_count
        );
        self.put(&path, entry("SubscriptionDescription", &fields))
            .await?;
        let rule_path = format!("{path}/Rules/{RULE_NAME}");
        self.put(&rule_path, entry("RuleDescription", &rule_xml(rule)))
            .await?;
        self.delete(&format!("{path}/Rules/$Default")).await
    }
}

/// The lock duration and delivery limit of an entity description.
pub(crate) fn entity_state(description: &str) -> SubscriptionState {
    SubscriptionState {
        filter: None,
        max_delivery_attempts: between(description, "<MaxDeliveryCount>", "</MaxDeliveryCount>")
            .and_then(|n| n.trim().parse().ok()),
        lease: between(description, "<LockDuration>", "</LockDuration>")
            .and_then(parse_iso_duration),
        ordered: None,
    }
}

/// How a plan shows a rule's filter: `TrueFilter`, `SqlFilter: <expression>` or
/// `CorrelationFilter: key=value, ...` (keys sorted).
pub(crate) fn rule_text(rule: &RuleFilter) -> String {
    match rule {
        RuleFilter::True => "TrueFilter".to_owned(),
        RuleFilter::Sql(expression) if expression.trim() == "1=1" => "TrueFilter".to_owned(),
        RuleFilter::Sql(expression) => format!("SqlFilter: {expression}"),
        RuleFilter::Correlation(pairs) => {
            let mut pairs: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            pairs.sort();
            format!("CorrelationFilter: {}", pairs.join(", "))
        }
    }
}

/// [`rule_text`] of a RuleDescription as the service writes it.
fn rule_text_of_description(description: &str) -> String {
    let filter = if description.contains("type=\"SqlFilter\"") {
        RuleFilter::Sql(xml_unescape(
            between(description, "<SqlExpression>", "</SqlExpression>").unwrap_or_default(),
        ))
    } else if description.contains("type=\"CorrelationFilter\"") {
        let mut pairs = Vec::new();
        let mut rest = description;
        while let (Some(key), Some(value_at)) = (
            between(rest, "<Key>", "</Key>"),
            rest.find("<Key>")
                .and_then(|k| rest[k..].find("<Value").map(|v| k + v)),
        ) {
            let after = &rest[value_at..];
            let value = after
                .find('>')
                .and_then(|open| {
                    after[open + 1..]
                        .find("</Value>")
                        .map(|end| &after[open + 1..open + 1 + end])
                })
                .unwrap_or_default();
            pairs.push((xml_unescape(key), xml_unescape(value)));
            let Some(next) = after.find("</Value>") else {
                break;
            };
            rest = &after[next + "</Value>".len()..];
        }
        RuleFilter::Correlation(pairs)
    } else if description.contains("type=\"TrueFilter\"") {
        RuleFilter::True
    } else {
        return format!(
            "an unknown rule: {}",
            between(description, "<Filter", "</Filter>").unwrap_or(description)
        );
    };
    rule_text(&filter)
}

fn xml_unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// An ISO 8601 duration of hours, minutes and seconds (`PT1M30.5S`, `P1D`).
fn parse_iso_duration(text: &str) -> Option<Duration> {
    let text = text.trim().strip_prefix('P')?;
    let (days, time) = match text.split_once('T') {
        Some((d, t)) => (d, t),
        None => (text, ""),
    };
    let mut seconds = 0f64;
    if let Some(d) = days.strip_suffix('D') {
        seconds += d.parse::<f64>().ok()? * 86_400.0;
    } else if !days.is_empty() {
        return None;
    }
    let mut number = String::new();
    for c in time.chars() {
        match c {
            '0'..='9' | '.' => number.push(c),
            'H' | 'M' | 'S' => {
                let n: f64 = number.parse().ok()?;
                seconds += n * match c {
                    'H' => 3600.0,
                    'M' => 60.0,
                    _ => 1.0,
                };
                number.clear();
            }
            _ => return None,
        }
    }
    Duration::try_from_secs_f64(seconds).ok()
}

/// The names a queue's description admits as subscriptions (see `admitted`).
pub(crate) fn admitted_of(description: &str) -> Vec<String> {
    parse_admitted(between(description, "<UserMetadata>", "</UserMetadata>").unwrap_or_default())
}

/// How a queue's `UserMetadata` lists the subscription names it admits.
const ADMITTED_PREFIX: &str = "cloudbus-subscriptions:";

fn parse_admitted(metadata: &str) -> Vec<String> {
    let metadata = metadata.replace("&amp;", "&");
    metadata
        .strip_prefix(ADMITTED_PREFIX)
        .map(|names| {
            names
                .split(',')
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The name of the one rule cloudbus keeps on a subscription.
pub(crate) const RULE_NAME: &str = "cloudbus";

/// What a path segment may hold unencoded.
const PATH_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'$');

/// `ActiveMessageCount` of an entity description, whatever prefix its namespace has
/// (the service writes `<d2p1:ActiveMessageCount>` inside `<CountDetails>`).
fn parse_active_message_count(description: &str) -> Option<u64> {
    let details = between(description, "CountDetails", "CountDetails>")?;
    let start = details.find("ActiveMessageCount>")? + "ActiveMessageCount>".len();
    let digits: String = details[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn not_found(path: &str) -> Error {
    Error::not_found(format!("Service Bus entity {path:?} does not exist"))
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let end = text[start..].find(close)? + start;
    Some(&text[start..end])
}

/// `PT30S`, `PT1M30.5S`.
fn iso_duration(d: Duration) -> String {
    let millis = d.as_millis();
    if millis.is_multiple_of(1000) {
        format!("PT{}S", millis / 1000)
    } else {
        format!("PT{}.{:03}S", millis / 1000, millis % 1000)
    }
}

/// XML text escaping.
pub(crate) fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn entry(kind: &str, fields: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?><entry xmlns="{ATOM}"><content type="application/xml"><{kind} xmlns="{SB}" xmlns:i="{XSI}">{fields}</{kind}></content></entry>"#
    )
}

fn rule_xml(rule: &RuleFilter) -> String {
    let filter = match rule {
        RuleFilter::True => {
            r#"<Filter i:type="TrueFilter"><SqlExpression>1=1</SqlExpression></Filter>"#.to_owned()
        }
        RuleFilter::Sql(expression) => format!(
            r#"<Filter i:type="SqlFilter"><SqlExpression>{}</SqlExpression></Filter>"#,
            xml_escape(expression)
        ),
        RuleFilter::Correlation(properties) => {
            let pairs: String = properties
                .iter()
                .map(|(k, v)| {
                    format!(
                        r#"<KeyValueOfstringanyType><Key>{}</Key><Value i:type="d6p1:string" xmlns:d6p1="http://www.w3.org/2001/XMLSchema">{}</Value></KeyValueOfstringanyType>"#,
                        xml_escape(k),
                        xml_escape(v)
                    )
                })
                .collect();
            format!(
                r#"<Filter i:type="CorrelationFilter"><Properties>{pairs}</Properties></Filter>"#
            )
        }
    };
    format!(r#"{filter}<Action i:type="EmptyRuleAction"/><Name>{RULE_NAME}</Name>"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_and_durations_read_back_as_written() {
        for rule in [
            RuleFilter::True,
            RuleFilter::Sql("[cloudEvents_type] LIKE 'a%' AND x <> 'y&z'".into()),
            RuleFilter::Correlation(vec![("b".into(), "2".into()), ("a".into(), "1 & 2".into())]),
        ] {
            let description = format!(
                "<entry><content><RuleDescription>{}</RuleDescription></content></entry>",
                rule_xml(&rule)
            );
            assert_eq!(rule_text_of_description(&description), rule_text(&rule));
        }
        assert_eq!(parse_iso_duration("PT30S"), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_iso_duration("PT1M30.5S"),
            Some(Duration::from_millis(90_500))
        );
        assert_eq!(
            parse_iso_duration("P1DT1H"),
            Some(Duration::from_secs(90_000))
        );
        assert_eq!(parse_iso_duration("30"), None);
    }

    #[test]
    fn active_message_count_is_read_from_count_details() {
        let queue = r#"<entry><content type="application/xml"><QueueDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect"><MessageCount>9</MessageCount><CountDetails xmlns:d2p1="http://schemas.microsoft.com/netservices/2011/06/servicebus"><d2p1:ActiveMessageCount>7</d2p1:ActiveMessageCount><d2p1:DeadLetterMessageCount>2</d2p1:DeadLetterMessageCount><d2p1:ScheduledMessageCount>0</d2p1:ScheduledMessageCount></CountDetails></QueueDescription></content></entry>"#;
        assert_eq!(parse_active_message_count(queue), Some(7));
        assert_eq!(
            parse_active_message_count(
                "<CountDetails><ActiveMessageCount>0</ActiveMessageCount></CountDetails>"
            ),
            Some(0)
        );
        assert_eq!(parse_active_message_count("<QueueDescription/>"), None);
    }

    #[test]
    fn durations_are_iso_8601() {
        assert_eq!(iso_duration(Duration::from_secs(30)), "PT30S");
        assert_eq!(iso_duration(Duration::from_millis(5500)), "PT5.500S");
    }

    #[test]
    fn rules_are_escaped_xml() {
        let xml = rule_xml(&RuleFilter::Sql("[cloudEvents:type] = 'a<b'".into()));
        assert!(
            xml.contains("<SqlExpression>[cloudEvents:type] = &apos;a&lt;b&apos;</SqlExpression>")
        );
        let xml = rule_xml(&RuleFilter::Correlation(vec![(
            "cloudEvents:type".into(),
            "x".into(),
        )]));
        assert!(xml.contains("<Key>cloudEvents:type</Key>"));
    }
}
