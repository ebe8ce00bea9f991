//! Property tests of the decoders an HTTP client reaches: the gateway's upload check
//! (`validate_upload`: a zip of a PEFT dir, its `adapter_config.json`, the safetensors inside)
//! on mutated uploads, and `adapter_config.json` on its own. Whatever the bytes, nothing
//! panics, and what is accepted is an adapter of the network in canonical form. (Messages and
//! bare safetensors have theirs in `protocol/tests/decode.rs` and `model/tests/adapter_io.rs`.)
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::sync::OnceLock;

use hivemind_model::adapter::{AdapterConfig, Limits};
use hivemind_node::driver::NetSpec;
use hivemind_node::gateway::validate_upload;
use hivemind_node::harness::TinyNetwork;
use proptest::prelude::*;

/// The tiny network's spec and a valid zipped PEFT dir of it (made once).
fn fixture() -> &'static (NetSpec, Vec<u8>, Vec<u8>) {
    static F: OnceLock<(NetSpec, Vec<u8>, Vec<u8>)> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let net = TinyNetwork::write(dir.path()).unwrap();
        let l = &net.lora;
        let spec =
            NetSpec::for_model(&net.model, l.rank, l.alpha, &l.target_modules, l.rule).unwrap();
        let adapter = net.adapter(5).unwrap();
        let config = adapter.config.to_json().unwrap();
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut buf);
            let opts = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated);
            z.start_file("adapter/adapter_config.json", opts).unwrap();
            z.write_all(&config).unwrap();
            z.start_file("adapter/adapter_model.safetensors", opts)
                .unwrap();
            z.write_all(&adapter.to_safetensors_bytes().unwrap())
                .unwrap();
            z.finish().unwrap();
        }
        (spec, buf.into_inner(), config)
    })
}

const MAX: u64 = 64 << 20;

/// The upload check is total, and what it accepts parses as an adapter of the network whose
/// canonical bytes it already is.
fn upload_is_total(name: &str, bytes: &[u8]) {
    let (spec, _, _) = fixture();
    if let Ok(canon) = validate_upload(spec, name, bytes, MAX) {
        let again = spec
            .parse(&canon, &Limits::DEFAULT)
            .expect("accepted, so it parses");
        assert_eq!(again.to_safetensors_bytes().unwrap(), canon);
    }
}

#[test]
fn the_valid_upload_passes() {
    let (spec, zip, _) = fixture();
    validate_upload(spec, "a.zip", zip, MAX).expect("the fixture is valid");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_zip_uploads_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in prop::option::of(any::<prop::sample::Index>()),
        name in prop::sample::select(vec!["a.zip", "a.safetensors", "adapter.bin"]),
    ) {
        let mut bytes = fixture().1.clone();
        for (i, b) in edits {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        upload_is_total(name, &bytes);
    }

    #[test]
    fn mutated_zip_directories_never_panic(
        // Edits in the last 200 bytes: the central directory and its end record (entry
        // counts, sizes, offsets), where a zip reader trusts numbers from the file.
        edits in prop::collection::vec((0usize..200, any::<u8>()), 1..6),
    ) {
        let mut bytes = fixture().1.clone();
        let n = bytes.len();
        for (back, b) in edits {
            bytes[n - 1 - back.min(n - 1)] = b;
        }
        upload_is_total("a.zip", &bytes);
    }

    #[test]
    fn mutated_adapter_configs_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(
            b"{}[],:\"0123456789-eE.truefalsn ".to_vec())), 1..6),
    ) {
        let mut bytes = fixture().2.clone();
        for (i, b) in edits {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        if let Ok(c) = AdapterConfig::from_json(&bytes) {
            let back = AdapterConfig::from_json(&c.to_json().unwrap()).expect("round trip");
            prop_assert_eq!(back, c);
        }
    }
}
