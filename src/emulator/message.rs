//! The message as the emulator holds it: the lowest layer of the emulator, named by the
//! store (what it keeps), the filters (what they look at) and the broker (what it sends).

use fe2o3_amqp::types::messaging::{Body, Message};
use fe2o3_amqp::types::primitives::Value;

/// One AMQP message with a body of any AMQP value, as senders send it.
pub type StoredMessage = Message<Body<Value>>;
