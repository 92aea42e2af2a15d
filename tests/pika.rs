//! Runs the Python client suites in `tests/python` (pika; `rstream` for the Stream
//! protocol) against the warren binary.
//! Needs pika and pytest (`tests/python/requirements.txt`): `./test.sh` installs them
//! into a virtualenv and names its interpreter in `WARREN_PYTHON` (default `python3`).

use std::process::Command;

#[test]
fn pika_suite_passes() {
    let root = env!("CARGO_MANIFEST_DIR");
    let python = std::env::var("WARREN_PYTHON").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python)
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
        .unwrap_or_else(|e| panic!("{python} does not run ({e}): run the tests with ./test.sh"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "pika suite failed with {python} (./test.sh installs pika and pytest):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("passed"), "no test ran:\n{stdout}");
}
