//! The payment service of sagas/order_fulfillment.toml, on saga-participant:
//! `cargo run -p saga-participant --example payment` (`AMQP_URL`, `DATABASE_URL` to change).
use saga_participant::{Command, HandlerFuture, Outcome, Participant};
use serde_json::json;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;

fn authorize<'a>(cmd: &'a Command, conn: &'a mut PgConnection) -> HandlerFuture<'a> {
    Box::pin(async move {
        let amount = cmd.input["amount_cents"].as_i64().unwrap_or(0);
        if amount > 100_000 {
            return Ok(Outcome::failure("amount over the limit")); // final: the saga compensates
        }
        sqlx::query(
            "INSERT INTO payments (saga_id, amount_cents, state) VALUES ($1, $2, 'authorized')",
        )
        .bind(cmd.saga_id)
        .bind(amount)
        .execute(&mut *conn)
        .await?;
        let id = cmd.saga_id.simple().to_string();
        Ok(Outcome::success(
            json!({"authorization": format!("auth-{}", &id[..8])}),
        ))
    })
}

fn refund<'a>(cmd: &'a Command, conn: &'a mut PgConnection) -> HandlerFuture<'a> {
    Box::pin(async move {
        sqlx::query("UPDATE payments SET state = 'refunded' WHERE saga_id = $1")
            .bind(cmd.saga_id)
            .execute(&mut *conn)
            .await?;
        Ok(Outcome::done())
    })
}

/// The payment participant (the tests run this too).
pub fn payment(amqp_url: String) -> Participant {
    Participant::new("payment")
        .amqp_url(amqp_url)
        .action("authorize_payment", authorize)
        .compensation("refund_payment", refund)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = |name, default: &str| std::env::var(name).unwrap_or(default.into());
    let url = env("DATABASE_URL", "postgres://postgres@127.0.0.1/payments");
    let pool = sqlx::PgPool::connect(&url).await?;
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move { tokio::signal::ctrl_c().await.map(|()| on_signal.cancel()) });
    // Until Ctrl-C: then it finishes the commands in flight and returns.
    payment(env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
        .run(pool, stop)
        .await?;
    Ok(())
}
