"""notifyd: a push-notification gateway from RabbitMQ to JWT-authenticated WebSockets."""

__version__ = "0.1.0"
