"""slackdist: a team's Slack export -> a chat model that talks like the team."""

__version__ = "0.1.0"
