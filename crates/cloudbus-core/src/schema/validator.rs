//! [`SchemaValidator`]: checks event data against the JSON Schema of the event's type
//! and version ([`CompiledSchema`], on the `boon` validator: every draft from 4 to
//! 2020-12), compiled once and kept in a bounded cache (least recently used out
//! first; a registry's "no schema" for a while).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::Value;

use crate::schema::registry::{SchemaId, SchemaRegistry};
use crate::typed::{event_version, split_type_version};
use crate::validation::{Checked, EventValidator};
use cloudbus_driver::error::{Error, ErrorKind, Result};
use cloudbus_driver::event::{AttributesReader, Data, Event};

/// At most this many violations are named in one error.
const VIOLATIONS_NAMED: usize = 3;

/// How many types and versions a validator keeps by default.
const DEFAULT_MAX_CACHED: usize = 1024;

/// One JSON Schema, compiled: what [`SchemaValidator`] keeps per type and version.
/// Any draft from 4 to 2020-12 (`$schema` names it; 2020-12 when it does not).
/// `format` is asserted under drafts 4, 6 and 7 (a `date-time` that is not one is a
/// violation) and an annotation under 2019-09 and 2020-12, as those drafts have it.
/// `pattern` is a Rust `regex` (no look-around, no backreferences: such a schema
/// does not compile). No `$ref` is fetched from the network or the disk: a schema is
/// self-contained, as the registry holds it.
pub struct CompiledSchema {
    schemas: boon::Schemas,
    index: boon::SchemaIndex,
}

impl std::fmt::Debug for CompiledSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledSchema").finish_non_exhaustive()
    }
}

/// Where the schema being compiled lives, for the resolver of its own `$ref`s (a
/// name: nothing is fetched from it).
const SCHEMA_LOCATION: &str = "http://cloudbus.invalid/schema.json";

/// The loader of `$ref`s to other documents: none is fetched.
struct NoRemoteRefs;

impl boon::UrlLoader for NoRemoteRefs {
    fn load(&self, url: &str) -> std::result::Result<Value, Box<dyn std::error::Error>> {
        Err(format!(
            "{url}: schemas are self-contained here; references to other documents are not fetched"
        )
        .into())
    }
}

impl CompiledSchema {
    /// Compiles `schema` (the schema of `id`); a text that is not a valid JSON
    /// Schema is an `Internal` error naming `id`.
    pub fn compile(id: &SchemaId, schema: Value) -> Result<Self> {
        let invalid = |e: &dyn std::fmt::Display| {
            Error::new(
                ErrorKind::Internal,
                format!("the schema of {id} is not a valid JSON Schema: {e}"),
            )
        };
        let mut compiler = boon::Compiler::new();
        compiler.use_loader(Box::new(NoRemoteRefs));
        let declared = schema.get("$schema").and_then(Value::as_str).unwrap_or("");
        if ["draft-04", "draft-06", "draft-07"]
            .iter()
            .any(|draft| declared.contains(draft))
        {
            compiler.enable_format_assertions();
        }
        compiler
            .add_resource(SCHEMA_LOCATION, schema)
            .map_err(|e| invalid(&e))?;
        let mut schemas = boon::Schemas::new();
        let index = compiler
            .compile(SCHEMA_LOCATION, &mut schemas)
            .map_err(|e| invalid(&e))?;
        Ok(CompiledSchema { schemas, index })
    }

    /// Up to `most` violations of `data`, each as `POINTER: what is wrong` (`/` for
    /// the whole value); none when it is valid.
    pub fn violations(&self, data: &Value, most: usize) -> Vec<String> {
        let mut found = Vec::new();
        if let Err(error) = self.schemas.validate(data, self.index) {
            leaf_violations(&error, most, &mut found);
        }
        found
    }
}

/// The leaves of boon's error tree (the keywords that failed), in order.
fn leaf_violations(error: &boon::ValidationError<'_, '_>, most: usize, found: &mut Vec<String>) {
    if found.len() >= most {
        return;
    }
    if error.causes.is_empty() {
        let at = error.instance_location.to_string();
        let at = if at.is_empty() { "/".to_owned() } else { at };
        found.push(format!("{at}: {}", error.kind));
        return;
    }
    for cause in &error.causes {
        leaf_violations(cause, most, found);
    }
}

/// Validates events against the schemas of a [`SchemaRegistry`]: give it to
/// [`Publisher::validate_with`](crate::Publisher::validate_with) to refuse bad data
/// before it is sent, and to the router's
/// [`SchemaValidationLayer`](crate::router::layers::SchemaValidationLayer) to
/// dead-letter bad data on the way in.
///
/// ```
/// use std::sync::Arc;
/// use cloudbus_core::{EventBuilder, EventValidator};
/// use cloudbus_core::schema::{DirectorySchemaRegistry, SchemaValidator};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> cloudbus_core::Result<()> {
/// let dir = std::env::temp_dir().join(format!("cloudbus-doc-validator-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// std::fs::write(
///     dir.join("com.example.ping.v1.json"),
///     r#"{"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}"#,
/// ).unwrap();
/// let validator = SchemaValidator::preloaded(Arc::new(DirectorySchemaRegistry::open(&dir)?)).await?;
/// let bad = EventBuilder::new("com.example.ping", "/doc")
///     .json(&serde_json::json!({"n": "seven"}))?.build()?;
/// let error = validator.validate(&bad).await.unwrap_err();
/// assert!(error.to_string().contains("/n"), "{error}");
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok(()) }
/// ```
pub struct SchemaValidator {
    registry: Arc<dyn SchemaRegistry>,
    /// Compiled schemas by id, and the ids the registry had none for (asked again
    /// after `recheck_missing`, so that a schema registered later is found). At most
    /// `max_cached`: types and versions come off the wire, and a producer that
    /// varies them must not grow it without bound.
    compiled: RwLock<HashMap<SchemaId, CacheEntry>>,
    recheck_missing: Duration,
    max_cached: usize,
    /// A counter that orders uses, for evicting the least recently used.
    uses: AtomicU64,
}

#[derive(Clone)]
enum Cached {
    Schema(Arc<CompiledSchema>),
    Missing(Instant),
}

struct CacheEntry {
    cached: Cached,
    last_used: AtomicU64,
}

impl std::fmt::Debug for SchemaValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let loaded = self.compiled.read().map(|c| c.len()).unwrap_or(0);
        f.debug_struct("SchemaValidator")
            .field("loaded", &loaded)
            .finish_non_exhaustive()
    }
}

impl SchemaValidator {
    /// A validator that fetches each schema from `registry` when first needed.
    pub fn new(registry: Arc<dyn SchemaRegistry>) -> Self {
        SchemaValidator {
            registry,
            compiled: RwLock::new(HashMap::new()),
            recheck_missing: Duration::from_secs(60),
            max_cached: DEFAULT_MAX_CACHED,
            uses: AtomicU64::new(0),
        }
    }

    /// How many types and versions (schemas and "no schema" answers) are kept at
    /// most (default 1024); the least recently used goes first.
    pub fn max_cached(mut self, max: usize) -> Self {
        self.max_cached = max.max(1);
        self
    }

    /// How many types and versions are kept now (schemas and "no schema" answers).
    pub fn cached_entries(&self) -> usize {
        self.compiled.read().map(|c| c.len()).unwrap_or(0)
    }

    /// How long the registry's "no schema" for a type and version is believed before
    /// it is asked again (default 60 s).
    pub fn recheck_missing(mut self, after: Duration) -> Self {
        self.recheck_missing = after;
        self
    }

    /// A validator with every schema of `registry` loaded and compiled, so that the
    /// publisher's synchronous `publish` checks every type (an invalid schema is an
    /// error here, not at the first event).
    pub async fn preloaded(registry: Arc<dyn SchemaRegistry>) -> Result<Self> {
        let validator = Self::new(registry);
        for id in validator.registry.list().await? {
            validator.load(&id).await?;
        }
        Ok(validator)
    }

    /// How many schemas are compiled.
    pub fn loaded(&self) -> usize {
        self.compiled
            .read()
            .map(|c| {
                c.values()
                    .filter(|v| matches!(v.cached, Cached::Schema(_)))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Fetches and compiles the schema of `id` (or learns that there is none).
    pub async fn load(&self, id: &SchemaId) -> Result<Option<Arc<CompiledSchema>>> {
        let compiled = match self.registry.schema(id).await? {
            Some(schema) => Some(Arc::new(CompiledSchema::compile(id, schema)?)),
            None => None,
        };
        let entry = match &compiled {
            Some(schema) => Cached::Schema(schema.clone()),
            None => Cached::Missing(Instant::now()),
        };
        self.keep(id, entry);
        Ok(compiled)
    }

    /// Keeps `cached` for `id`, making room first: "no schema" answers past their
    /// time, then the least recently used.
    fn keep(&self, id: &SchemaId, cached: Cached) {
        let Ok(mut cache) = self.compiled.write() else {
            return;
        };
        if !cache.contains_key(id) && cache.len() >= self.max_cached {
            let recheck = self.recheck_missing;
            cache
                .retain(|_, e| !matches!(e.cached, Cached::Missing(at) if at.elapsed() >= recheck));
            while cache.len() >= self.max_cached {
                let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, e)| e.last_used.load(Ordering::Relaxed))
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                cache.remove(&oldest);
            }
        }
        let used = self.uses.fetch_add(1, Ordering::Relaxed);
        cache.insert(
            id.clone(),
            CacheEntry {
                cached,
                last_used: AtomicU64::new(used),
            },
        );
    }

    /// What is known of `id`: `Some(Some(schema))`, `Some(None)` (none, recently
    /// asked), or `None` (to be fetched).
    fn cached(&self, id: &SchemaId) -> Option<Option<Arc<CompiledSchema>>> {
        let cache = self.compiled.read().ok()?;
        let entry = cache.get(id)?;
        entry
            .last_used
            .store(self.uses.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        match &entry.cached {
            Cached::Schema(schema) => Some(Some(schema.clone())),
            Cached::Missing(at) if at.elapsed() < self.recheck_missing => Some(None),
            Cached::Missing(_) => None,
        }
    }

    /// Checks `event`'s data with `schema`.
    fn check(id: &SchemaId, schema: &CompiledSchema, event: &Event) -> Result<Checked> {
        let parsed;
        let data: &Value = match event.data() {
            Some(Data::Json(v)) => v,
            Some(Data::String(s)) => {
                parsed = serde_json::from_str(s).map_err(|e| not_json(id, event, e))?;
                &parsed
            }
            Some(Data::Binary(b)) => {
                parsed = serde_json::from_slice(b).map_err(|e| not_json(id, event, e))?;
                &parsed
            }
            None => &Value::Null,
        };
        let violations = schema.violations(data, VIOLATIONS_NAMED + 1);
        if violations.is_empty() {
            return Ok(Checked::Valid);
        }
        let more = if violations.len() > VIOLATIONS_NAMED {
            ", …"
        } else {
            ""
        };
        let named = violations
            .iter()
            .take(VIOLATIONS_NAMED)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        Err(Error::invalid(format!(
            "event {} does not match the schema of {id}: {named}{more}",
            event.id()
        )))
    }
}

fn not_json(id: &SchemaId, event: &Event, e: serde_json::Error) -> Error {
    Error::with_source(
        ErrorKind::InvalidArgument,
        format!(
            "event {} has data that is not JSON; {id} needs JSON",
            event.id()
        ),
        e,
    )
}

/// The schema id of an event: its type without version suffix, and its version.
fn id_of(event: &Event) -> SchemaId {
    SchemaId::new(split_type_version(event.ty()).0, event_version(event))
}

#[async_trait]
impl EventValidator for SchemaValidator {
    fn validate_loaded(&self, event: &Event) -> Result<Checked> {
        let id = id_of(event);
        match self.cached(&id) {
            Some(Some(schema)) => Self::check(&id, &schema, event),
            Some(None) => Ok(Checked::NoSchema),
            None => Ok(Checked::NotLoaded),
        }
    }

    async fn validate(&self, event: &Event) -> Result<Checked> {
        let id = id_of(event);
        let schema = match self.cached(&id) {
            Some(schema) => schema,
            None => self.load(&id).await?,
        };
        match schema {
            Some(schema) => Self::check(&id, &schema, event),
            None => Ok(Checked::NoSchema),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::AtomicUsize;

    use cloudbus_driver::event::EventBuilder;

    /// A registry with one schema (com.example.known v1) that counts its lookups.
    #[derive(Default)]
    struct CountingRegistry {
        lookups: AtomicUsize,
    }

    #[async_trait]
    impl SchemaRegistry for CountingRegistry {
        async fn schema(&self, id: &SchemaId) -> Result<Option<Value>> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            Ok((id.ty == "com.example.known").then(|| serde_json::json!({"type": "object"})))
        }
        async fn list(&self) -> Result<Vec<SchemaId>> {
            Ok(vec![SchemaId::new("com.example.known", 1)])
        }
    }

    fn event(ty: &str) -> Event {
        EventBuilder::new(ty, "/test")
            .json(&serde_json::json!({}))
            .unwrap()
            .build()
            .unwrap()
    }

    /// Issue 28 item 12: every type and version seen on the wire was kept for ever,
    /// misses included, so a producer varying `type` grew the map without bound.
    #[tokio::test]
    async fn the_cache_is_bounded_and_keeps_what_is_used() {
        let registry = Arc::new(CountingRegistry::default());
        let validator = SchemaValidator::new(registry.clone()).max_cached(8);
        let known = event("com.example.known");
        assert_eq!(validator.validate(&known).await.unwrap(), Checked::Valid);
        for n in 0..1_000 {
            let ty = format!("com.example.random-{n}");
            assert_eq!(
                validator.validate(&event(&ty)).await.unwrap(),
                Checked::NoSchema
            );
            // The known type stays in use, so it stays cached.
            assert_eq!(validator.validate_loaded(&known).unwrap(), Checked::Valid);
            assert!(
                validator.cached_entries() <= 8,
                "{} kept",
                validator.cached_entries()
            );
        }
        assert_eq!(validator.loaded(), 1);
        // One lookup per distinct id, the known one's once.
        assert_eq!(registry.lookups.load(Ordering::SeqCst), 1_001);
    }

    /// A "no schema" answer is believed for `recheck_missing`, then asked again.
    #[tokio::test]
    async fn misses_are_asked_again_after_their_time() {
        let registry = Arc::new(CountingRegistry::default());
        let validator =
            SchemaValidator::new(registry.clone()).recheck_missing(Duration::from_millis(30));
        let unknown = event("com.example.unknown");
        validator.validate(&unknown).await.unwrap();
        validator.validate(&unknown).await.unwrap();
        assert_eq!(registry.lookups.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(
            validator.validate_loaded(&unknown).unwrap(),
            Checked::NotLoaded
        );
        validator.validate(&unknown).await.unwrap();
        assert_eq!(registry.lookups.load(Ordering::SeqCst), 2);
    }

    fn id() -> SchemaId {
        SchemaId::new("com.example.t", 1)
    }

    /// A schema that points at another document is refused when it is compiled: no
    /// `$ref` is fetched from the network or read from the disk.
    #[test]
    fn references_to_other_documents_are_never_fetched() {
        for reference in [
            "http://127.0.0.1:9/other.json",
            "file:///etc/passwd",
            "other.json",
        ] {
            let schema = serde_json::json!({"$ref": reference});
            let e = CompiledSchema::compile(&id(), schema).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Internal, "{e}");
            assert!(e.message().contains("com.example.t"), "{e}");
        }
        // A reference inside the schema itself resolves.
        let own = serde_json::json!({
            "$defs": {"n": {"type": "integer"}},
            "properties": {"n": {"$ref": "#/$defs/n"}}
        });
        let compiled = CompiledSchema::compile(&id(), own).unwrap();
        assert_eq!(
            compiled.violations(&serde_json::json!({"n": "x"}), 3),
            ["/n: want integer, but got string"]
        );
    }

    /// `format` is asserted under draft 7, every failing keyword is named at its
    /// place, and at most the asked number.
    #[test]
    fn violations_name_their_place_and_formats_are_asserted() {
        let schema = serde_json::json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "required": ["at", "n"],
            "properties": {
                "at": {"type": "string", "format": "date-time"},
                "n": {"type": "integer", "minimum": 1}
            }
        });
        let compiled = CompiledSchema::compile(&id(), schema).unwrap();
        assert!(
            compiled
                .violations(
                    &serde_json::json!({"at": "2026-12-07T06:00:00Z", "n": 1}),
                    3
                )
                .is_empty()
        );
        let found = compiled.violations(&serde_json::json!({"at": "yesterday", "n": 0}), 3);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("/at: "), "{found:?}");
        assert!(found[1].starts_with("/n: "), "{found:?}");
        assert_eq!(compiled.violations(&serde_json::json!([]), 1).len(), 1);
        assert!(compiled.violations(&serde_json::json!([]), 1)[0].starts_with("/: "));
    }

    /// Under 2020-12 (the default) `format` is an annotation, as the draft has it; a
    /// `pattern` outside Rust's `regex` (look-around) is a schema that does not
    /// compile, not a silently passing one.
    #[test]
    fn formats_are_annotations_under_2020_12_and_patterns_are_rust_regexes() {
        let schema = serde_json::json!({"type": "string", "format": "date-time"});
        let compiled = CompiledSchema::compile(&id(), schema).unwrap();
        assert!(
            compiled
                .violations(&serde_json::json!("yesterday"), 3)
                .is_empty()
        );
        let lookahead = serde_json::json!({"type": "string", "pattern": "^(?!test-)"});
        let e = CompiledSchema::compile(&id(), lookahead).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Internal, "{e}");
    }
}
