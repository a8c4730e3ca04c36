//! Build script: embeds the bundled rulesets (every `rulesets/*.toml`) into the binary, and
//! compiles `proto/mistguard/v1/guard.proto` for the daemon.

use std::env;
use std::fs;
use std::path::Path;

fn main() {
    embed_rulesets();
    compile_protos().expect("compile proto/mistguard/v1/guard.proto");
}

/// Compiles the gRPC service with protox (pure Rust; no system `protoc`) and writes the
/// descriptor set that the daemon serves through gRPC reflection.
fn compile_protos() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/mistguard/v1/guard.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out_dir = Path::new(&env::var("OUT_DIR")?).to_path_buf();
    fs::write(
        out_dir.join("mistguard_v1_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}

fn embed_rulesets() {
    let manifest = env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    let dir = Path::new(&manifest).join("rulesets");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<_> = fs::read_dir(&dir)
        .expect("rulesets/ directory")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut out = String::from("/// (file name, contents) of each bundled ruleset file.\npub static BUNDLED: &[(&str, &str)] = &[\n");
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        let name = f.file_name().unwrap().to_string_lossy();
        out.push_str(&format!(
            "    ({name:?}, include_str!({:?})),\n",
            f.display().to_string()
        ));
    }
    out.push_str("];\n");
    let dest = Path::new(&env::var("OUT_DIR").unwrap()).join("bundled_rulesets.rs");
    fs::write(dest, out).expect("write bundled_rulesets.rs");
}
