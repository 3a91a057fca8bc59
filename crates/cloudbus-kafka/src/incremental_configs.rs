//! Kafka's `IncrementalAlterConfigs` (KIP-339), the one admin call topology needs
//! that rdkafka 0.39 does not wrap: it sets a topic's configs one by one and leaves
//! the others as they are. (The older `AlterConfigs`, which rdkafka wraps, replaces a
//! topic's whole config, so setting `retention.ms` with it would reset every other
//! config set on the topic; brokers such as tansu only have the incremental call.)
//! It goes through librdkafka's C API on a queue of its own and blocks until the
//! answer, at most the timeout given: call it off the async threads.

use std::ffi::{CString, c_char};
use std::ptr;
use std::time::Duration;

use cloudbus_driver::{Error, ErrorKind, Result};
use rdkafka::admin::AdminClient;
use rdkafka::bindings as rd;
use rdkafka::client::ClientContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::error::kind_of_code;

/// Sets `configs` (`name`, `value`) on `topic` through `admin`'s client, waiting up
/// to `timeout` for the broker's answer. A broker without the call is
/// `Unsupported`; a refused config is the broker's error, named.
pub(crate) fn set_topic_configs<C: ClientContext>(
    admin: &AdminClient<C>,
    topic: &str,
    configs: &[(&str, &str)],
    timeout: Duration,
) -> Result<()> {
    let invalid = |what: &str| Error::invalid(format!("{what} holds a NUL byte"));
    let topic_c = CString::new(topic).map_err(|_| invalid("the topic name"))?;
    let mut named = Vec::with_capacity(configs.len());
    for (name, value) in configs {
        named.push((
            CString::new(*name).map_err(|_| invalid("a config name"))?,
            CString::new(*value).map_err(|_| invalid("a config value"))?,
        ));
    }
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let rk = admin.inner().native_ptr();
    // SAFETY: `rk` is the live client of `admin`, borrowed for this call. Every
    // object made here is destroyed on every path by its guard below; the strings
    // outlive the calls that read them (librdkafka copies them).
    unsafe {
        let resource = Owned::new(
            rd::rd_kafka_ConfigResource_new(
                rd::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TOPIC,
                topic_c.as_ptr(),
            ),
            rd::rd_kafka_ConfigResource_destroy,
        );
        if resource.0.is_null() {
            // librdkafka refuses an empty name.
            return Err(Error::invalid(format!(
                "{topic:?} is not a topic name librdkafka accepts"
            )));
        }
        for (name, value) in &named {
            let error = rd::rd_kafka_ConfigResource_add_incremental_config(
                resource.0,
                name.as_ptr(),
                rd::rd_kafka_AlterConfigOpType_t::RD_KAFKA_ALTER_CONFIG_OP_TYPE_SET,
                value.as_ptr(),
            );
            if !error.is_null() {
                let message = text(rd::rd_kafka_error_string(error));
                rd::rd_kafka_error_destroy(error);
                return Err(Error::invalid(format!(
                    "config {:?} of topic {topic:?}: {message}",
                    name.to_string_lossy()
                )));
            }
        }
        let options = Owned::new(
            rd::rd_kafka_AdminOptions_new(
                rk,
                rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_INCREMENTALALTERCONFIGS,
            ),
            rd::rd_kafka_AdminOptions_destroy,
        );
        let mut errstr = [0 as c_char; 512];
        // A timeout in range cannot be refused.
        let _ = rd::rd_kafka_AdminOptions_set_request_timeout(
            options.0,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        if options.0.is_null() {
            return Err(Error::new(
                ErrorKind::Internal,
                "librdkafka made no options for IncrementalAlterConfigs",
            ));
        }
        let queue = Owned::new(rd::rd_kafka_queue_new(rk), rd::rd_kafka_queue_destroy);
        if queue.0.is_null() {
            return Err(Error::new(
                ErrorKind::Internal,
                "librdkafka made no queue for IncrementalAlterConfigs",
            ));
        }
        let mut resources = [resource.0];
        rd::rd_kafka_IncrementalAlterConfigs(
            rk,
            resources.as_mut_ptr(),
            resources.len(),
            options.0,
            queue.0,
        );
        // The request's own timeout answers first; the margin covers the queueing.
        let event = rd::rd_kafka_queue_poll(queue.0, timeout_ms.saturating_add(5_000));
        if event.is_null() {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!("changing the configs of topic {topic:?} took over {timeout:?}"),
            ));
        }
        let event = Owned::new(event, rd::rd_kafka_event_destroy);
        let code = RDKafkaErrorCode::from(rd::rd_kafka_event_error(event.0));
        if code != RDKafkaErrorCode::NoError {
            let message = text(rd::rd_kafka_event_error_string(event.0));
            return Err(refused(code, topic, &message));
        }
        let result = rd::rd_kafka_event_IncrementalAlterConfigs_result(event.0);
        if result.is_null() {
            return Err(Error::new(
                ErrorKind::Internal,
                format!(
                    "changing the configs of topic {topic:?}: librdkafka answered another event"
                ),
            ));
        }
        let mut count = 0usize;
        let answered = rd::rd_kafka_IncrementalAlterConfigs_result_resources(result, &mut count);
        for i in 0..count {
            let resource = *answered.add(i);
            let code = RDKafkaErrorCode::from(rd::rd_kafka_ConfigResource_error(resource));
            if code != RDKafkaErrorCode::NoError {
                let message = text(rd::rd_kafka_ConfigResource_error_string(resource));
                return Err(refused(code, topic, &message));
            }
        }
        Ok(())
    }
}

/// The error of a refused change, by the broker's code.
fn refused(code: RDKafkaErrorCode, topic: &str, message: &str) -> Error {
    let kind = kind_of_code(code);
    let detail = if message.is_empty() {
        code.to_string()
    } else {
        format!("{code}: {message}")
    };
    Error::new(
        kind,
        format!("the broker refused to change the configs of topic {topic:?} ({detail})"),
    )
}

/// A C string librdkafka owns, as text (empty for NULL).
///
/// # Safety
/// `s` is NULL or a NUL-terminated string alive for this call.
unsafe fn text(s: *const c_char) -> String {
    if s.is_null() {
        String::new()
    } else {
        // SAFETY: as the caller promises.
        unsafe { rdkafka::util::cstr_to_owned(s) }
    }
}

/// A librdkafka object destroyed when the guard drops.
struct Owned<T>(*mut T, unsafe extern "C" fn(*mut T));

impl<T> Owned<T> {
    fn new(ptr: *mut T, destroy: unsafe extern "C" fn(*mut T)) -> Self {
        Owned(ptr, destroy)
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the pointer came from the constructor paired with `destroy`,
            // and nothing else destroys it.
            unsafe { (self.1)(self.0) };
            self.0 = ptr::null_mut();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::client::DefaultClientContext;

    /// An admin client of a broker that is not there (nothing listens on port 1).
    fn unreachable_admin() -> AdminClient<DefaultClientContext> {
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .create()
            .expect("an admin client")
    }

    /// A NUL byte (or an empty topic name, which librdkafka refuses with a NULL) is
    /// `InvalidArgument`, not a crash.
    #[test]
    fn a_name_or_value_with_a_nul_byte_is_refused_before_any_call() {
        let admin = unreachable_admin();
        for (topic, name, value) in [
            ("", "retention.ms", "1"),
            ("t\0", "retention.ms", "1"),
            ("t", "retention\0.ms", "1"),
            ("t", "retention.ms", "1\0"),
        ] {
            let e = set_topic_configs(&admin, topic, &[(name, value)], Duration::from_secs(1))
                .expect_err("a NUL byte");
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        }
    }

    /// With no broker the call ends with librdkafka's answer at its timeout (not the
    /// 5 s margin of the poll after it), with an error, not a hang.
    #[test]
    fn no_broker_is_an_error_within_the_timeout() {
        let admin = unreachable_admin();
        let started = std::time::Instant::now();
        let e = set_topic_configs(
            &admin,
            "t",
            &[("retention.ms", "1")],
            Duration::from_secs(1),
        )
        .expect_err("no broker");
        assert!(
            matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Unavailable),
            "{e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(7),
            "{:?}",
            started.elapsed()
        );
    }
}
