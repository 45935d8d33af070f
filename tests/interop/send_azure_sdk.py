"""Send N messages to a topic with the official Azure Service Bus SDK.

Usage: send_azure_sdk.py CONNECTION_STRING TOPIC N

Used by tests/it/emulator.rs (python_sdk_sends_to_topic) against the emulator with a
`UseDevelopmentEmulator=true` connection string.
"""

import sys

from azure.servicebus import ServiceBusClient, ServiceBusMessage


def main() -> int:
    conn_str, topic, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with ServiceBusClient.from_connection_string(conn_str) as client:
        with client.get_topic_sender(topic_name=topic) as sender:
            for i in range(n):
                sender.send_messages(
                    ServiceBusMessage(
                        '{"source":"python-%d"}' % i,
                        subject="temp",
                        content_type="application/json",
                        application_properties={"origin": "azure-sdk"},
                    )
                )
    print(f"sent {n} messages to {topic}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
