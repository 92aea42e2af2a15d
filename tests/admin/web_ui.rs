//! The management web UI is served on the admin port beside the API.

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_ui_is_served_beside_the_api() {
    let b = start().await;
    let base = b.base.clone();
    let (index, js, css, challenge, plain_challenge) = tokio::task::spawn_blocking(move || {
        let get = |p: &str| ureq::get(&format!("{base}{p}")).call().expect(p);
        let index = get("/");
        let js = get("/ui/app.js");
        let css = get("/ui/style.css");
        let status_and_header = |r: Result<ureq::Response, ureq::Error>| match r {
            Err(ureq::Error::Status(s, r)) => (s, r.header("www-authenticate").map(String::from)),
            other => panic!("expected 401, got {other:?}"),
        };
        let challenge = status_and_header(
            ureq::get(&format!("{base}/api/overview"))
                .set("X-Requested-With", "XMLHttpRequest")
                .call(),
        );
        let plain = status_and_header(ureq::get(&format!("{base}/api/overview")).call());
        (
            (
                index.content_type().to_string(),
                index.into_string().unwrap(),
            ),
            js.content_type().to_string(),
            css.content_type().to_string(),
            challenge,
            plain,
        )
    })
    .await
    .unwrap();
    assert_eq!(index.0, "text/html");
    assert!(index.1.contains("/ui/app.js"));
    assert_eq!(js, "text/javascript");
    assert_eq!(css, "text/css");
    // The UI's own requests get no browser password prompt; other clients do.
    assert_eq!(challenge, (401, None));
    assert_eq!(plain_challenge.0, 401);
    assert!(plain_challenge.1.unwrap().starts_with("Basic"));
    let (s, _) = b.call("GET", "/ui/missing.js", None, None).await;
    assert_eq!(s, 404);
}
