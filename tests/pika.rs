//! Runs the Python (pika) client suite in `tests/python` against the warren binary.
//! Needs `pip install pika pytest` (done by `.ci/run`).

use std::process::Command;

#[test]
fn pika_suite_passes() {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("python3")
        .args([
            "-m",
            "pytest",
            "tests/python",
            "-q",
            "-p",
            "no:cacheprovider",
        ])
        .env("WARREN_BIN", env!("CARGO_BIN_EXE_warren"))
        .current_dir(root)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "pika suite failed (it needs `pip install pika pytest`):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("passed"), "no test ran:\n{stdout}");
}
