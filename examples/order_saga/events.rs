//! The saga's events: serde types with their CloudEvents type and version (the order
//! id is the subject and the ordering key), and the upcaster of the one type that has
//! two versions.

use cloudbus::CloudEvent;
use serde::{Deserialize, Serialize};

// The saga's events: serde types with their CloudEvents type and version; the order
// id is the subject and the ordering key.
#[derive(Serialize, Deserialize, CloudEvent, Clone, Debug)]
#[cloudevent(
    type = "com.example.saga.OrderCreated",
    version = 2,
    source = "/services/order"
)]
pub struct OrderCreated {
    #[cloudevent(key, subject)]
    pub order_id: String,
    pub customer: String,
    pub amount_cents: u64,
    pub currency: String,
}

#[derive(Serialize, Deserialize, CloudEvent, Clone, Debug)]
#[cloudevent(
    type = "com.example.saga.PaymentSucceeded",
    source = "/services/payment"
)]
pub struct PaymentSucceeded {
    #[cloudevent(key, subject)]
    pub order_id: String,
    pub customer: String,
    pub amount_cents: u64,
}

#[derive(Serialize, Deserialize, CloudEvent, Clone, Debug)]
#[cloudevent(type = "com.example.saga.PaymentFailed", source = "/services/payment")]
pub struct PaymentFailed {
    #[cloudevent(key, subject)]
    pub order_id: String,
    pub customer: String,
    pub reason: String,
}

#[derive(Serialize, Deserialize, CloudEvent, Clone, Debug)]
#[cloudevent(
    type = "com.example.saga.StockReserved",
    source = "/services/inventory"
)]
pub struct StockReserved {
    #[cloudevent(key, subject)]
    pub order_id: String,
    pub customer: String,
}

#[derive(Serialize, Deserialize, CloudEvent, Clone, Debug)]
#[cloudevent(type = "com.example.saga.OrderConfirmed", source = "/services/order")]
pub struct OrderConfirmed {
    #[cloudevent(key, subject)]
    pub order_id: String,
    pub customer: String,
}

#[derive(Serialize, Deserialize, CloudEvent, Clone, Debug)]
#[cloudevent(type = "com.example.saga.OrderCancelled", source = "/services/order")]
pub struct OrderCancelled {
    #[cloudevent(key, subject)]
    pub order_id: String,
    pub customer: String,
    pub reason: String,
}

/// What the old checkout service still sends: OrderCreated version 1, in euros.
#[derive(Serialize, Deserialize, CloudEvent, Clone, Debug)]
#[cloudevent(
    type = "com.example.saga.OrderCreated",
    version = 1,
    source = "/services/checkout-v1"
)]
pub struct OrderCreatedV1 {
    #[cloudevent(key, subject)]
    pub order_id: String,
    pub customer: String,
    pub amount: f64,
}

/// OrderCreated version 1 to version 2: euros to cents, the currency made explicit.
pub fn order_created_v1_to_v2(mut v1: serde_json::Value) -> Result<serde_json::Value, String> {
    let euros = v1["amount"].as_f64().ok_or("amount is not a number")?;
    let data = v1.as_object_mut().ok_or("data is not an object")?;
    data.remove("amount");
    data.insert(
        "amount_cents".into(),
        serde_json::json!((euros * 100.0).round() as i64),
    );
    data.insert("currency".into(), "EUR".into());
    Ok(v1)
}
