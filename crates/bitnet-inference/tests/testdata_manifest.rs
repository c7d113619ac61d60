//! The repo's fixture copy is byte-identical to the generator's output (MANIFEST.json sha256).

mod common;

use sha2::{Digest, Sha256};

#[test]
fn fixture_files_match_their_manifest_hashes() {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("MANIFEST.json")).unwrap())
            .unwrap();
    let files = manifest["files"].as_object().unwrap();
    let mut checked = 0;
    for (rel, info) in files {
        let path = common::fixture(rel);
        // Converter logs are not copied; every other listed file must be present.
        if rel.ends_with(".convert.log") && !path.exists() {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(
            bytes.len() as u64,
            info["bytes"].as_u64().unwrap(),
            "{rel}: size"
        );
        let digest: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(digest, info["sha256"].as_str().unwrap(), "{rel}: sha256");
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} files checked");
}

#[test]
fn perplexity_text_matches_its_reference_hash() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("ref/perplexity.json")).unwrap(),
    )
    .unwrap();
    let bytes = std::fs::read(common::fixture("ref/ppl.txt")).unwrap();
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(digest, reference["text_sha256"].as_str().unwrap());
}
