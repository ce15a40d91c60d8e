"""The payment service of sagas/order_fulfillment.toml, on saga_participant."""
import asyncio
import os

from saga_participant import Failure, Participant, Success

payment = Participant(
    "payment",
    amqp_url=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
    database_url=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/payments"),
)


@payment.action("authorize_payment")
async def authorize(cmd, conn):
    amount = cmd.input.get("amount_cents", 0)
    if amount > 100_000:
        return Failure("amount over the limit")  # final: the saga compensates
    await conn.execute(
        "INSERT INTO payments (saga_id, amount_cents, state) VALUES (%s, %s, 'authorized')",
        (cmd.saga_id, amount),
    )
    return Success({"authorization": f"auth-{cmd.saga_id.hex[:8]}"})


@payment.compensation("refund_payment")
async def refund(cmd, conn):
    await conn.execute("UPDATE payments SET state = 'refunded' WHERE saga_id = %s", (cmd.saga_id,))
    return Success()


if __name__ == "__main__":
    asyncio.run(payment.run())
