//! The workload: which definition a scenario runs, and which variant of it.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    /// Every step succeeds: create_order, authorize_payment, schedule_delivery, approve_order.
    A,
    /// schedule_delivery (the pivot) fails for good: refund_payment, cancel_order.
    B,
    /// `food_delivery`, every step succeeds: create_order, then authorize_payment,
    /// accept_order and (for half of the sagas, those with a coupon) redeem_coupon in parallel,
    /// then dispatch_rider and notify_customer. Needs a sagad that runs graph definitions.
    F,
}

impl Variant {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Variant::A => "A",
            Variant::B => "B",
            Variant::F => "F",
        }
    }

    pub(crate) fn definition(self) -> &'static str {
        match self {
            Variant::A | Variant::B => "order_fulfillment",
            Variant::F => "food_delivery",
        }
    }

    pub(crate) fn input(self, order_id: &str) -> Value {
        match self {
            Variant::A => json!({ "order_id": order_id, "amount_cents": 4200 }),
            Variant::B => json!({
                "order_id": order_id, "amount_cents": 4200, "fail_at": "schedule_delivery"
            }),
            Variant::F => {
                let mut input = json!({
                    "customer_id": format!("c-{order_id}"), "shop_id": "s-1",
                    "items": [{"sku": "bibimbap", "qty": 2}], "amount_cents": 12900,
                    "address": "1 Main St"
                });
                // Keys end with the saga's sequence number: every other saga has a coupon.
                if order_id.ends_with(['0', '2', '4', '6', '8']) {
                    input["coupon"] = json!("WELCOME");
                }
                input
            }
        }
    }

    /// The lifecycle event that ends a saga of this variant as expected.
    pub(crate) fn expected_event(self) -> &'static str {
        match self {
            Variant::A | Variant::F => "completed",
            Variant::B => "compensated",
        }
    }

    /// Command round trips (command out, reply back) per saga, on average.
    pub(crate) fn commands(self) -> f64 {
        match self {
            Variant::A => 4.0, // create, authorize, schedule, approve
            Variant::B => 5.0, // create, authorize, schedule (fails), refund, cancel
            // create, authorize, accept, redeem (half of the sagas), dispatch, notify
            Variant::F => 5.5,
        }
    }

    /// Durable commits per saga: sagad's transitions (1 start + 1 per reply) plus the
    /// participant's own commit per command (the demo commits once per command).
    pub(crate) fn commits(self) -> f64 {
        (1.0 + self.commands()) + self.commands()
    }
}
