//! Every provider's decoder against the fuzz corpus (fuzz/corpus): no input panics.
//! It needs the providers' features (`cargo test --features aws,azure,gcp --test
//! fuzz_corpus`); scripts/test.sh runs it with the CLI, which builds them all.

#[test]
fn decoders_survive_the_fuzz_corpus() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let ran = cloudbus::fuzzing::run_corpus(&corpus, 20_000, 12);
    assert!(ran > 20_000, "the corpus is missing: {ran} inputs");
}
