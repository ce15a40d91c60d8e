//! The operator console in a real browser: Debian's chromium, driven through chromedriver,
//! against an in-process sagad and the demo participants on the real servers. Screenshots of
//! the main pages land in `target/tmp/console-screenshots/`.

use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use saga::proto::v1 as pb;
use serde_json::json;

use crate::helpers::*;

const OPERATOR: &str = "operator-token-0123456789abcdef";
const PARTICIPANT: &str = "participant-token-0123456789abcdef";
const PATIENCE: Duration = Duration::from_secs(45);

/// One browser at a time: chromium is the heaviest process these tests start.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Browser {
    c: Client,
    base: String,
    _driver: tokio::process::Child,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Browser {
    async fn open(console: std::net::SocketAddr) -> Browser {
        let turn = ONE_BROWSER.lock().await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver runs (Debian's chromium-driver package; .ci/run installs it)");
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                         "--disable-background-networking", "--disable-sync",
                         "--disable-dev-shm-usage", "--window-size=1280,1000"],
            },
        });
        let caps = caps.as_object().unwrap().clone();
        let deadline = Instant::now() + PATIENCE;
        let c = loop {
            let mut builder =
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
            match builder
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "no browser session: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        Browser {
            c,
            base: format!("http://{console}"),
            _driver: driver,
            _turn: turn,
        }
    }

    async fn goto(&self, path: &str) {
        self.c.goto(&format!("{}{path}", self.base)).await.unwrap();
    }

    async fn path(&self) -> String {
        self.c.current_url().await.unwrap().path().to_string()
    }

    /// The text of the first element matching `css` ("" when there is none).
    async fn text(&self, css: &str) -> String {
        match self.c.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    async fn click(&self, css: &str) {
        self.c
            .find(Locator::Css(css))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.c.find(Locator::Css(css)).await.unwrap();
        e.send_keys(text).await.unwrap();
    }

    /// Waits until the element's text contains `needle`; returns the text.
    async fn wait_text(&self, css: &str, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = self.text(css).await;
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {css} to show {needle:?}; it shows {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self, name: &str) {
        let png = self.c.screenshot().await.unwrap();
        let dir = saga_testkit::bins::target_tmp().join("console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    async fn close(self) {
        self.c.close().await.unwrap();
    }
}

async fn saga<C>(client: &mut pb::saga_service_client::SagaServiceClient<C>, id: &str) -> pb::Saga
where
    C: tonic::client::GrpcService<tonic::body::Body>,
    C::Error: Into<tonic::codegen::StdError>,
    C::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <C::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    client
        .get_saga(pb::GetSagaRequest { saga_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Waits until the saga's only current step is `step` (its command held by a paused participant).
async fn wait_at(
    client: &mut pb::saga_service_client::SagaServiceClient<AuthChannel>,
    id: &str,
    step: &str,
) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let s = saga(client, id).await;
        if s.current_steps == [step] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "saga {id} never waited at {step}: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn pause(admin: &mut pb::admin_service_client::AdminServiceClient<AuthChannel>, who: &str) {
    admin
        .pause_participant(pb::ParticipantRequest {
            participant: who.into(),
            reason: "card processor maintenance".into(),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_logs_in_finds_a_saga_stuck_on_a_paused_participant_and_watches_it_complete() {
    let env = TestEnv::new();
    let mut settings = env.settings(&repo_sagas());
    settings.operator_token = Some(OPERATOR.into());
    settings.participant_token = Some(PARTICIPANT.into());
    let app = spawn_app(settings).await;
    let _demo = spawn_demo(&env, |_| {});
    let (mut sagas, mut admin) = clients(app.addr, Some(OPERATOR)).await;
    pause(&mut admin, "payment").await;
    let id = start(&mut sagas, json!({"order_id": "C-1", "amount_cents": 4200})).await;
    wait_at(&mut sagas, &id, "authorize_payment").await;

    let b = Browser::open(app.console_addr).await;
    b.goto("/").await;
    assert_eq!(
        b.path().await,
        "/login",
        "an anonymous visitor is sent to the login"
    );

    // A participant token, then a wrong one, are refused; the operator's logs in.
    for (token, refusal) in [
        (PARTICIPANT, "participant token"),
        ("not-a-token-at-all", "unknown token"),
    ] {
        b.type_into("input[name=token]", token).await;
        b.click("button[type=submit]").await;
        b.wait_text("#error", refusal).await;
        assert_eq!(b.path().await, "/login");
        assert!(b.c.find(Locator::Css("table#waiting")).await.is_err());
    }
    // A login posted from elsewhere (no login cookie of this console's form) is refused, even
    // with the operator's token.
    let status =
        b.c.execute_async(
            "const done = arguments[arguments.length - 1];
             fetch('/login', {method: 'POST', credentials: 'omit',
               headers: {'Content-Type': 'application/x-www-form-urlencoded'},
               body: 'csrf=forged&token=' + encodeURIComponent(arguments[0])})
               .then(r => done(r.status));",
            vec![json!(OPERATOR)],
        )
        .await
        .unwrap();
    assert_eq!(status, json!(403));
    b.type_into("input[name=token]", OPERATOR).await;
    b.click("button[type=submit]").await;

    // The inbox: the saga waits at authorize_payment, on a paused participant.
    let row = b.wait_text("table#waiting", "authorize_payment").await;
    assert!(row.contains("payment") && row.contains("paused"), "{row}");
    b.screenshot("inbox").await;
    b.click("table#waiting td.num a").await;
    b.wait_text("table#sagas", &id).await;
    b.click(&format!("table#sagas a[href='/sagas/{id}']")).await;

    // Why it is stuck, at a glance.
    let why = b.wait_text("#why", "authorize_payment").await;
    assert!(why.contains("running"), "{why}");
    let reasons = b.text("#reasons").await;
    assert!(
        reasons.contains("Commands to payment are held: paused by operator")
            && reasons.contains("card processor maintenance"),
        "the header says why the step waits: {reasons}"
    );
    b.screenshot("saga-stuck").await;
    let node =
        b.c.find(Locator::Css("svg.graph g[data-step=authorize_payment]"))
            .await
            .unwrap();
    let state = node.attr("data-state").await.unwrap();
    assert!(
        matches!(state.as_deref(), Some("running" | "held")),
        "the graph shows the waiting step: {state:?}"
    );
    let saga_tab = b.c.window().await.unwrap();

    // Resume the participant in another tab; the saga's tab follows it to the end by itself.
    let tab = b.c.new_window(true).await.unwrap().handle;
    b.c.switch_to_window(tab).await.unwrap();
    b.goto("/participants").await;
    b.type_into(
        "tr[data-participant=payment] input[name=reason]",
        "maintenance over",
    )
    .await;
    b.click("tr[data-participant=payment] button").await;
    b.wait_text("#done", "resumed payment").await;
    assert!(
        b.text("tr[data-participant=payment]")
            .await
            .contains("flowing")
    );
    b.screenshot("participants").await;
    b.c.switch_to_window(saga_tab).await.unwrap();
    b.wait_text("#why", "completed").await;
    let refreshed =
        b.c.find(Locator::Css("main#live"))
            .await
            .unwrap()
            .attr("data-refreshed")
            .await
            .unwrap();
    assert!(
        refreshed.is_some_and(|n| n.parse::<u32>().unwrap() >= 1),
        "the page changed without a reload"
    );
    assert_eq!(
        b.path().await,
        format!("/sagas/{id}"),
        "no navigation happened in the saga's tab"
    );
    b.screenshot("saga-completed").await;

    // The resume is audited with the operator's name.
    let participants = admin
        .list_participants(pb::ListParticipantsRequest {})
        .await
        .unwrap()
        .into_inner()
        .participants;
    let payment = participants.iter().find(|p| p.name == "payment").unwrap();
    assert!(!payment.paused);
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_actions_follow_the_apis_rules_escape_inputs_and_refuse_forged_forms() {
    let env = TestEnv::new();
    let app = spawn_app(env.settings(&repo_sagas())).await;
    let _demo = spawn_demo(&env, |_| {});
    let (mut sagas, mut admin) = clients(app.addr, None).await;
    pause(&mut admin, "delivery").await;
    let hostile = "<script>window.__owned = 1</script><img src=x onerror=window.__owned=2>";
    let id = start(&mut sagas, json!({"order_id": "C-2", "note": hostile})).await;
    wait_at(&mut sagas, &id, "schedule_delivery").await;

    let b = Browser::open(app.console_addr).await;
    b.goto(&format!("/sagas/{id}")).await;
    b.wait_text("#why", "schedule_delivery").await;
    // The input is shown as text, and nothing in it ran.
    assert!(b.text("pre#input").await.contains(hostile));
    let owned =
        b.c.execute("return window.__owned === undefined", vec![])
            .await
            .unwrap();
    assert_eq!(owned, json!(true), "the saga's input ran as script");

    // Forged forms: a wrong CSRF token, or none, are refused and change nothing.
    for body in ["reason=forged&csrf=0000", "reason=forged"] {
        let status = b
            .c
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 fetch(arguments[0], {method: 'POST', credentials: 'same-origin',
                   headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: arguments[1]})
                   .then(r => done(r.status));",
                vec![json!(format!("/sagas/{id}/actions/resolve")), json!(body)],
            )
            .await
            .unwrap();
        assert_eq!(status, json!(403), "{body}");
    }
    assert_eq!(
        saga(&mut sagas, &id).await.status,
        pb::SagaStatus::Running as i32
    );

    // Compensate with a reason: previewed, applied, and in the timeline with the reason.
    b.click("#actions a[href$='/actions/compensate']").await;
    let preview = b.wait_text("main", "What will happen").await;
    assert!(
        preview.contains("authorize_payment → create_order"),
        "{preview}"
    );
    b.type_into("textarea[name=reason]", "customer cancelled by phone")
        .await;
    b.click("#action-form button.danger").await;
    b.wait_text("#done", "compensate the saga").await;
    let timeline = b.wait_text("table#timeline", "operator_action").await;
    assert!(
        timeline.contains("customer cancelled by phone"),
        "{timeline}"
    );
    assert!(timeline.contains("compensation_started"), "{timeline}");
    b.screenshot("saga-compensated-by-operator").await;
    let after = saga(&mut sagas, &id).await;
    assert!(
        after.status == pb::SagaStatus::Compensating as i32
            || after.status == pb::SagaStatus::Compensated as i32,
        "{after:#?}"
    );
    let actions = operator_actions(&after);
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert_eq!(actions[0]["reason"], "customer cancelled by phone");

    // A repair that does not fit is refused with the engine's reason, on the same form.
    b.goto(&format!("/sagas/{id}/actions/skip?step=create_order"))
        .await;
    b.type_into("textarea[name=reason]", "try to skip a finished step")
        .await;
    b.click("#action-form button.danger").await;
    b.wait_text("#error", "Refused").await;

    // Bulk redrive by query: a dry run with its count and sample, then the run and its results.
    pause(&mut admin, "payment").await;
    let mut stuck = Vec::new();
    for i in 0..3 {
        stuck.push(start(&mut sagas, json!({"order_id": format!("R-{i}")})).await);
    }
    for s in &stuck {
        wait_at(&mut sagas, s, "authorize_payment").await;
    }
    b.goto("/redrive?status=unfinished&step=authorize_payment")
        .await;
    b.type_into("#redrive-form input[name=reason]", "processor is back")
        .await;
    b.click("#redrive-form button[type=submit]").await;
    b.wait_text("#matched", "3 unfinished sagas match").await;
    let sample = b.c.find_all(Locator::Css("#sample li")).await.unwrap();
    assert_eq!(sample.len(), 3);
    b.screenshot("redrive-dry-run").await;
    for s in &stuck {
        assert!(
            operator_actions(&saga(&mut sagas, s).await).is_empty(),
            "a dry run changes nothing"
        );
    }
    b.click("#redrive-run button.danger").await;
    b.wait_text("#progress", "Finished").await;
    let results =
        b.c.find_all(Locator::Css("table#results tbody tr"))
            .await
            .unwrap();
    assert_eq!(results.len(), 3);
    let text = b.text("table#results").await;
    for s in &stuck {
        assert!(text.contains(&format!("{s} retried")), "{text}");
        let actions = operator_actions(&saga(&mut sagas, s).await);
        assert_eq!(actions.len(), 1, "{actions:?}");
        assert_eq!(actions[0]["reason"], "processor is back");
    }
    b.screenshot("redrive-done").await;

    // A mapped step's attempt shows the input its mapping gave, not the saga's whole input.
    admin
        .resume_participant(pb::ParticipantRequest {
            participant: "payment".into(),
            reason: "done".into(),
        })
        .await
        .unwrap();
    let food = start_definition(
        &mut sagas,
        "food_delivery",
        json!({"customer_id": "cu-7", "shop_id": "closed-9", "items": ["pho"], "amount_cents": 1234}),
    )
    .await;
    b.goto(&format!("/sagas/{food}")).await;
    b.wait_text("#why", "compensated").await;
    let attempts = b.c.find(Locator::Css("table#attempts")).await.unwrap();
    let first_input = attempts
        .find(Locator::Css("pre[id^=in-]"))
        .await
        .unwrap()
        .prop("textContent")
        .await
        .unwrap()
        .unwrap_or_default();
    let shown: serde_json::Value = serde_json::from_str(&first_input).unwrap();
    assert_eq!(
        shown,
        json!({"customer_id": "cu-7", "shop_id": "closed-9", "items": ["pho"]}),
        "create_order's mapped input"
    );

    // Search by a value in the input finds the saga; the definition page draws its graph.
    b.goto("/search?q=order_id%3DC-2").await;
    b.wait_text("table#sagas", &id).await;
    b.goto("/definitions/food_delivery/1").await;
    let graph =
        b.c.find_all(Locator::Css("svg.graph g.node"))
            .await
            .unwrap();
    assert_eq!(graph.len(), 6);
    b.screenshot("definition").await;
    b.close().await;
}
