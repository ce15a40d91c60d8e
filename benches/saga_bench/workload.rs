//! The workload: which variant of the definition a scenario runs.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    /// Every step succeeds: create_order, authorize_payment, schedule_delivery, approve_order.
    A,
    /// schedule_delivery (the pivot) fails for good: refund_payment, cancel_order.
    B,
}

impl Variant {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Variant::A => "A",
            Variant::B => "B",
        }
    }

    pub(crate) fn input(self, order_id: &str) -> Value {
        match self {
            Variant::A => json!({ "order_id": order_id, "amount_cents": 4200 }),
            Variant::B => json!({
                "order_id": order_id, "amount_cents": 4200, "fail_at": "schedule_delivery"
            }),
        }
    }

    /// The lifecycle event that ends a saga of this variant as expected.
    pub(crate) fn expected_event(self) -> &'static str {
        match self {
            Variant::A => "completed",
            Variant::B => "compensated",
        }
    }

    /// Command round trips (command out, reply back) per saga.
    pub(crate) fn commands(self) -> u32 {
        match self {
            Variant::A => 4, // create, authorize, schedule, approve
            Variant::B => 5, // create, authorize, schedule (fails), refund, cancel
        }
    }

    /// Durable commits per saga: sagad's transitions (1 start + 1 per reply) plus the
    /// participant's own commit per command (the demo commits once per command).
    pub(crate) fn commits(self) -> u32 {
        (1 + self.commands()) + self.commands()
    }
}
