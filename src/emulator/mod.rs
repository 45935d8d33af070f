//! The ASB emulator (DESIGN §6): an AMQP 1.0 broker that behaves like Azure Service Bus
//! for the parts the gateway uses.

pub mod client;
