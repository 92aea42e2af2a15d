//! Runs the browser suite in `tests/ui` (headless Chromium driven by playwright-core)
//! against the warren binary. Needs `npm ci --prefix tests/ui` and Debian's
//! `chromium` package (or `CHROMIUM` naming a Chromium binary): `./test.sh` provisions both.

use std::path::Path;
use std::process::Command;

#[test]
fn ui_suite_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let modules = root.join("tests/ui/node_modules/playwright-core");
    assert!(
        modules.exists(),
        "{} is missing: run the tests with ./test.sh (or `npm ci --prefix tests/ui` first)",
        modules.display()
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: run the tests with ./test.sh (or `apt-get install -y chromium`, or set CHROMIUM)"
    );
    let output = Command::new("node")
        .arg("tests/ui/run.mjs")
        .arg(env!("CARGO_BIN_EXE_warren"))
        .env("CHROMIUM", &chromium)
        .current_dir(root)
        .output()
        .expect("node runs (install Node.js 20 or newer)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "UI suite failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(" passed, 0 failed"),
        "no UI test ran:\n{stdout}"
    );
}
