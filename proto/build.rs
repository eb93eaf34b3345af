//! Compiles `corral/v1/*.proto` with the pure-Rust `protox`, so no system
//! `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "corral/v1/run.proto",
        "corral/v1/events.proto",
        "corral/v1/tracker.proto",
        "corral/v1/node.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
