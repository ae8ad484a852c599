"""What subscribers act on: unsubscribe (and, later, preferences and the Telegram bot)."""
