//! Load generation: closed loop (N in flight) and open loop (a fixed start rate).

use super::*;

pub(crate) type Client = SagaServiceClient<Channel>;

pub(crate) async fn connect_clients(addr: &str, n: usize) -> anyhow::Result<Vec<Client>> {
    let mut clients = Vec::new();
    for _ in 0..n.max(1) {
        // One Endpoint::connect is one HTTP/2 connection.
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        clients.push(SagaServiceClient::new(channel));
    }
    Ok(clients)
}

/// Starts one saga and waits for its terminal event. Returns when it ended and how.
pub(crate) async fn one_saga(
    client: &mut Client,
    tracker: &Tracker,
    variant: Variant,
    key: String,
    deadline: tokio::time::Instant,
) -> Result<Ended, String> {
    let request = pb::StartSagaRequest {
        definition: variant.definition().into(),
        input_json: variant.input(&key).to_string(),
        idempotency_key: key,
    };
    let started = tokio::time::timeout_at(deadline, client.start_saga(request))
        .await
        .map_err(|_| "StartSaga timed out".to_string())?
        .map_err(|s| format!("StartSaga: {} {}", s.code(), s.message()))?
        .into_inner();
    let id: Uuid = started
        .saga_id
        .parse()
        .map_err(|e| format!("StartSaga returned a bad id: {e}"))?;
    let rx = tracker.wait_for(id);
    match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(ended)) => Ok(ended),
        Ok(Err(_)) => Err(format!("saga {id}: observer stopped")),
        Err(_) => Err(format!("saga {id}: no terminal event in time")),
    }
}

/// What a load phase produced.
pub(crate) struct LoadResult {
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    pub(crate) reasons: Vec<String>,
    /// Microseconds.
    pub(crate) latency: Histogram<u64>,
    pub(crate) elapsed: Duration,
    pub(crate) max_in_flight: usize,
}

impl LoadResult {
    pub(crate) fn new() -> Self {
        LoadResult {
            ok: 0,
            failed: 0,
            reasons: Vec::new(),
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap(),
            elapsed: Duration::ZERO,
            max_in_flight: 0,
        }
    }

    pub(crate) fn record(
        &mut self,
        variant: Variant,
        from: Instant,
        result: Result<Ended, String>,
    ) -> Instant {
        match result {
            Ok((at, event)) if event == variant.expected_event() => {
                self.ok += 1;
                let us = at.saturating_duration_since(from).as_micros() as u64;
                self.latency.saturating_record(us.max(1));
                at
            }
            Ok((at, event)) => {
                self.fail(format!(
                    "ended {event}, expected {}",
                    variant.expected_event()
                ));
                at
            }
            Err(reason) => {
                self.fail(reason);
                Instant::now()
            }
        }
    }

    pub(crate) fn fail(&mut self, reason: String) {
        self.failed += 1;
        if self.reasons.len() < 5 {
            self.reasons.push(reason);
        }
    }

    pub(crate) fn merge(&mut self, other: LoadResult) {
        self.ok += other.ok;
        self.failed += other.failed;
        for r in other.reasons {
            if self.reasons.len() < 5 {
                self.reasons.push(r);
            }
        }
        self.latency.add(&other.latency).unwrap();
    }

    pub(crate) fn ms(&self, q: f64) -> f64 {
        round(self.latency.value_at_quantile(q) as f64 / 1000.0, 2)
    }
}

/// Closed loop: `in_flight` tasks, each starting a saga as soon as its previous one ended.
pub(crate) async fn closed_loop(
    clients: &[Client],
    tracker: &Arc<Tracker>,
    variant: Variant,
    count: usize,
    in_flight: usize,
    prefix: &str,
    timeout: Duration,
) -> LoadResult {
    let next = Arc::new(AtomicUsize::new(0));
    let begin = Instant::now();
    let mut tasks = JoinSet::new();
    for w in 0..in_flight.clamp(1, count.max(1)) {
        let mut client = clients[w % clients.len()].clone();
        let tracker = tracker.clone();
        let next = next.clone();
        let prefix = prefix.to_string();
        tasks.spawn(async move {
            let mut result = LoadResult::new();
            let mut last = begin;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let from = Instant::now();
                let deadline = tokio::time::Instant::from_std(from + timeout);
                let r = one_saga(
                    &mut client,
                    &tracker,
                    variant,
                    format!("{prefix}-{i}"),
                    deadline,
                )
                .await;
                last = last.max(result.record(variant, from, r));
            }
            (result, last)
        });
    }
    let mut total = LoadResult::new();
    let mut last = begin;
    while let Some(done) = tasks.join_next().await {
        let (r, l) = done.expect("load task panicked");
        total.merge(r);
        last = last.max(l);
    }
    total.elapsed = last - begin;
    total.max_in_flight = in_flight.min(count);
    total
}

/// Open loop: saga i is due at `i / rate` seconds; its latency counts from then, however late
/// the start call itself went out, so a slow system cannot hide its queueing.
pub(crate) async fn open_loop(
    clients: &[Client],
    tracker: &Arc<Tracker>,
    variant: Variant,
    count: usize,
    rate: f64,
    prefix: &str,
    timeout: Duration,
) -> LoadResult {
    let t0 = Instant::now() + Duration::from_millis(20);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut max_in_flight = 0;
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let due = t0 + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        max_in_flight = max_in_flight.max(in_flight.fetch_add(1, Ordering::Relaxed) + 1);
        let mut client = clients[i % clients.len()].clone();
        let tracker = tracker.clone();
        let key = format!("{prefix}-{i}");
        let in_flight = in_flight.clone();
        tasks.spawn(async move {
            let deadline = tokio::time::Instant::from_std(due + timeout);
            let r = one_saga(&mut client, &tracker, variant, key, deadline).await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
            (due, r)
        });
    }
    let mut total = LoadResult::new();
    let mut last = t0;
    while let Some(done) = tasks.join_next().await {
        let (due, r) = done.expect("load task panicked");
        last = last.max(total.record(variant, due, r));
    }
    total.elapsed = last - t0;
    total.max_in_flight = max_in_flight;
    total
}
