"""What subscribers act on: unsubscribe, the preferences page's model, the Telegram bot,
`alerts users`, and bounce and complaint reports."""
