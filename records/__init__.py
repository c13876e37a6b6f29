"""What every part of radvlm-pacs shares: settings, database tables and sessions."""
