//! Output: the machine, the table and the JSON document of the figures.

use super::*;

pub(crate) fn machine_info() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']))
        })
        .unwrap_or("unknown")
        .to_string();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| round(kib / 1024.0 / 1024.0, 1));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": model,
        "memory_gib": mem_gib,
        "loadavg_at_start": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}

pub(crate) fn scenario_json(r: &ScenarioResult, raw: Option<&RawLimits>) -> Value {
    let per = r.load.ok.max(1) as f64;
    let limit = raw.map(|raw| raw.pipeline_limit(r.scenario.variant));
    json!({
        "scenario": r.scenario.label,
        "variant": r.scenario.variant.name(),
        "mode": if r.scenario.rate.is_some() { "open" } else { "closed" },
        "in_flight": r.scenario.in_flight,
        "rate": r.scenario.rate,
        "max_in_flight": r.load.max_in_flight,
        "warmup": r.scenario.warmup,
        "sagas": r.scenario.sagas,
        "completed": r.load.ok,
        "failed": r.load.failed,
        "failures": r.load.reasons,
        "elapsed_s": round(r.load.elapsed.as_secs_f64(), 3),
        "sagas_per_s": round(r.per_s(), 1),
        "latency_ms": {
            "p50": r.load.ms(0.50), "p90": r.load.ms(0.90), "p99": r.load.ms(0.99),
            "max": round(r.load.latency.max() as f64 / 1000.0, 2),
            "mean": round(r.load.latency.mean() / 1000.0, 2),
        },
        "sagad_cpu_s_per_saga": round(r.cpu_per_saga(), 6),
        "sagad_cpu_cores": round(r.sagad_cpu_s / r.load.elapsed.as_secs_f64().max(1e-9), 2),
        "sagad_peak_rss_mib": round(r.sagad_peak_rss_kib as f64 / 1024.0, 1),
        "sagad_rss_end_mib": round(r.sagad_rss_end_kib as f64 / 1024.0, 1),
        "pipeline_limit_sagas_per_s": limit.map(|l| round(l, 1)),
        "fraction_of_limit": limit.map(|l| round(r.per_s() / l, 3)),
        "cpu_s_per_saga": r.cpu.json(per),
        "pg_write_xacts_per_saga": round(r.pg_write_xacts as f64 / per, 2),
        "pg_wal_bytes_per_saga": round(r.pg_wal_bytes as f64 / per, 0),
        "outbox_backlog": { "mean": round(r.outbox_backlog.0, 1), "max": r.outbox_backlog.1 },
        "step_ms": {
            "steps": r.steps.steps,
            "sagad_sent_to_participant_began": {
                "p50": r.steps.to_participant[0], "p90": r.steps.to_participant[1], "p99": r.steps.to_participant[2],
            },
            "participant_began_to_sagad_got_reply": {
                "p50": r.steps.to_sagad[0], "p90": r.steps.to_sagad[1], "p99": r.steps.to_sagad[2],
            },
        },
    })
}

pub(crate) fn print_table(results: &[ScenarioResult], raw: Option<&RawLimits>) {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    t.set_header(vec![
        "scenario",
        "load",
        "done",
        "failed",
        "sagas/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "sagad CPU ms/saga",
        "sagad cores",
        "sagad peak RSS MiB",
        "% of limit",
    ]);
    for r in results {
        let load = match r.scenario.rate {
            Some(rate) => format!("open {rate}/s"),
            None => format!("{} in flight", r.scenario.in_flight),
        };
        let limit = raw
            .map(|raw| {
                format!(
                    "{:.0}%",
                    100.0 * r.per_s() / raw.pipeline_limit(r.scenario.variant)
                )
            })
            .unwrap_or_else(|| "-".into());
        t.add_row(vec![
            r.scenario.label.clone(),
            load,
            r.load.ok.to_string(),
            r.load.failed.to_string(),
            format!("{:.0}", r.per_s()),
            format!("{:.1}", r.load.ms(0.50)),
            format!("{:.1}", r.load.ms(0.90)),
            format!("{:.1}", r.load.ms(0.99)),
            format!("{:.1}", r.load.latency.max() as f64 / 1000.0),
            format!("{:.3}", 1000.0 * r.cpu_per_saga()),
            format!(
                "{:.2}",
                r.sagad_cpu_s / r.load.elapsed.as_secs_f64().max(1e-9)
            ),
            format!("{:.1}", r.sagad_peak_rss_kib as f64 / 1024.0),
            limit,
        ]);
    }
    println!("{t}");

    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    t.set_header(vec![
        "scenario",
        "CPU ms/saga: sagad",
        "demo",
        "postgres",
        "rabbitmq",
        "bench",
        "other",
        "machine",
        "PG write xacts/saga",
        "WAL KiB/saga",
    ]);
    for r in results {
        let per = r.load.ok.max(1) as f64;
        let ms = |x: f64| format!("{:.3}", 1000.0 * x / per);
        t.add_row(vec![
            r.scenario.label.clone(),
            ms(r.cpu.sagad),
            ms(r.cpu.demo),
            ms(r.cpu.postgres),
            ms(r.cpu.rabbitmq),
            ms(r.cpu.bench),
            ms(r.cpu.other),
            ms(r.cpu.machine),
            format!("{:.1}", r.pg_write_xacts as f64 / per),
            format!("{:.1}", r.pg_wal_bytes as f64 / per / 1024.0),
        ]);
    }
    println!("where the CPU went (whole machine, measured phase):\n{t}");

    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    t.set_header(vec![
        "scenario",
        "steps",
        "sagad sent → participant began, p50/p90/p99 ms",
        "participant began → sagad got reply, p50/p90/p99 ms",
        "outbox backlog mean / max",
    ]);
    for r in results {
        let f = |v: [f64; 3]| format!("{:.1} / {:.1} / {:.1}", v[0], v[1], v[2]);
        t.add_row(vec![
            r.scenario.label.clone(),
            r.steps.steps.to_string(),
            f(r.steps.to_participant),
            f(r.steps.to_sagad),
            format!("{:.1} / {}", r.outbox_backlog.0, r.outbox_backlog.1),
        ]);
    }
    println!("where a step's time went (from the timestamps sagad and the demo store):\n{t}");
    for r in results {
        if r.cpu.other / r.load.elapsed.as_secs_f64().max(1e-9) > 0.1 {
            println!(
                "note: {}: other processes used {:.2} cores during the measurement; treat its figures as provisional",
                r.scenario.label,
                r.cpu.other / r.load.elapsed.as_secs_f64().max(1e-9)
            );
        }
        if r.load.failed > 0 {
            println!(
                "FAILED: {}: {} sagas did not end as expected, e.g. {:?}",
                r.scenario.label, r.load.failed, r.load.reasons
            );
        }
    }
}

pub(crate) fn print_raw(raw: &RawLimits, variants: &[Variant]) {
    println!(
        "raw limits (synchronous_commit={}, fsync={}):",
        raw.synchronous_commit, raw.fsync
    );
    println!(
        "  RabbitMQ: {:.0} confirmed persistent round trips/s (publish+confirm → consume+ack → reply+confirm → consume+ack, durable queues); one at a time: {:.0}/s = {:.2} ms each",
        raw.rabbit_rt_per_s,
        raw.rabbit_rt_per_s_serial,
        1000.0 / raw.rabbit_rt_per_s_serial.max(1e-9)
    );
    for (c, rate) in &raw.pg_commits {
        println!(
            "  PostgreSQL: {rate:.0} single-row durable commits/s with {c} connection{} ({:.2} ms per commit per connection)",
            if *c == 1 { "" } else { "s" },
            1000.0 * *c as f64 / rate.max(1e-9)
        );
    }
    for v in variants {
        println!(
            "  pipeline limit, variant {}: min({:.0} / {} commands, {:.0} / {} commits) = {:.0} sagas/s",
            v.name(),
            raw.rabbit_rt_per_s,
            v.commands(),
            raw.pg_best(),
            v.commits(),
            raw.pipeline_limit(*v)
        );
    }
    println!(
        "  (commands = command round trips per saga; commits = sagad transitions (1 start + 1 per reply) + 1 participant commit per command)"
    );
    for v in variants {
        if let Some(floor) = raw.serial_floor_ms(*v) {
            println!(
                "  one saga alone, variant {}: about {floor:.1} ms if its {} round trips and {} commits each waited as long as in the one-at-a-time probes (indicative only)",
                v.name(),
                v.commands(),
                v.commits()
            );
        }
    }
}
