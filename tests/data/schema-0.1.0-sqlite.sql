-- The schema of budgetkit 0.1.0 (commit 65d4c04), as its create_all made it on sqlite:
-- every table and index, exact DDL. tests/test_schema.py upgrades a database made from it.

CREATE TABLE budgetkit_budget_alert (
	id INTEGER NOT NULL, 
	window_id INTEGER NOT NULL, 
	kind VARCHAR(40) NOT NULL, 
	budget VARCHAR(200) NOT NULL, 
	period VARCHAR(16) NOT NULL, 
	unit VARCHAR(16) NOT NULL, 
	scope_key VARCHAR(500) NOT NULL, 
	window_start DATETIME NOT NULL, 
	level VARCHAR(16) NOT NULL, 
	spent BIGINT NOT NULL, 
	reserved BIGINT NOT NULL, 
	limit_amount BIGINT NOT NULL, 
	message VARCHAR NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_budgetkit_budget_alert UNIQUE (window_id, kind)
);

CREATE INDEX ix_budgetkit_budget_alert_time ON budgetkit_budget_alert (created_at);

CREATE TABLE budgetkit_budget_approval (
	id VARCHAR(32) NOT NULL, 
	window_id INTEGER NOT NULL, 
	budget VARCHAR(200) NOT NULL, 
	scope_key VARCHAR(500) NOT NULL, 
	window_start DATETIME NOT NULL, 
	extra BIGINT NOT NULL, 
	unlimited BOOLEAN NOT NULL, 
	expires_at DATETIME, 
	approved_by VARCHAR(200), 
	reason VARCHAR, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_budgetkit_budget_approval_window ON budgetkit_budget_approval (window_id, expires_at);

CREATE TABLE budgetkit_budget_reservation (
	ticket_id VARCHAR(32) NOT NULL, 
	window_id INTEGER NOT NULL, 
	amount BIGINT NOT NULL, 
	expires_at DATETIME NOT NULL, 
	PRIMARY KEY (ticket_id, window_id)
);

CREATE INDEX ix_budgetkit_budget_reservation_expiry ON budgetkit_budget_reservation (window_id, expires_at);

CREATE TABLE budgetkit_budget_window (
	id INTEGER NOT NULL, 
	budget VARCHAR(200) NOT NULL, 
	period VARCHAR(16) NOT NULL, 
	unit VARCHAR(16) NOT NULL, 
	scope_key VARCHAR(500) NOT NULL, 
	window_start DATETIME NOT NULL, 
	window_end DATETIME, 
	spent BIGINT NOT NULL, 
	reserved BIGINT NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_budgetkit_budget_window UNIQUE (budget, period, unit, scope_key, window_start)
);

CREATE TABLE budgetkit_cache_entry (
	seq INTEGER NOT NULL, 
	"key" VARCHAR(64) NOT NULL, 
	namespace VARCHAR(200) NOT NULL, 
	model TEXT NOT NULL, 
	price_model VARCHAR(200), 
	partition_id INTEGER NOT NULL, 
	params_hash VARCHAR(64) NOT NULL, 
	context_hash VARCHAR(64) NOT NULL, 
	focus TEXT NOT NULL, 
	embedder VARCHAR(200), 
	embedding BLOB, 
	response JSON, 
	task_type VARCHAR(64), 
	created_at DATETIME NOT NULL, 
	expires_at DATETIME, 
	last_hit_at DATETIME, 
	hit_count INTEGER NOT NULL, 
	cost_nanos BIGINT NOT NULL, 
	input_tokens INTEGER NOT NULL, 
	output_tokens INTEGER NOT NULL, 
	PRIMARY KEY (seq)
);

CREATE UNIQUE INDEX ix_budgetkit_cache_entry_key ON budgetkit_cache_entry ("key");

CREATE INDEX ix_budgetkit_cache_entry_partition_id ON budgetkit_cache_entry (partition_id);

CREATE INDEX ix_budgetkit_cache_expires ON budgetkit_cache_entry (expires_at);

CREATE INDEX ix_budgetkit_cache_ns_model ON budgetkit_cache_entry (namespace, model);

CREATE TABLE budgetkit_cache_partition (
	id INTEGER NOT NULL, 
	hash VARCHAR(64) NOT NULL, 
	namespace VARCHAR(200) NOT NULL, 
	model TEXT NOT NULL, 
	params_hash VARCHAR(64) NOT NULL, 
	context_hash VARCHAR(64) NOT NULL, 
	embedder VARCHAR(200) NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (hash)
);

CREATE TABLE budgetkit_rollup_state (
	name VARCHAR(64) NOT NULL, 
	version INTEGER NOT NULL, 
	built_at DATETIME NOT NULL, 
	PRIMARY KEY (name)
);

CREATE TABLE budgetkit_usage (
	id VARCHAR(32) NOT NULL, 
	created_at DATETIME NOT NULL, 
	operation_type VARCHAR(64) NOT NULL, 
	provider VARCHAR(64), 
	model VARCHAR(200) NOT NULL, 
	input_tokens INTEGER NOT NULL, 
	output_tokens INTEGER NOT NULL, 
	cached_input_tokens INTEGER NOT NULL, 
	cache_write_tokens INTEGER NOT NULL, 
	reasoning_tokens INTEGER NOT NULL, 
	total_tokens INTEGER NOT NULL, 
	cost_nanos BIGINT NOT NULL, 
	saved_nanos BIGINT NOT NULL, 
	latency_ms FLOAT, 
	status VARCHAR(16) NOT NULL, 
	error_type VARCHAR(200), 
	usage_source VARCHAR(16) NOT NULL, 
	user_id VARCHAR(200), 
	session_id VARCHAR(200), 
	request_id VARCHAR(200), 
	run_id VARCHAR(64), 
	parent_run_id VARCHAR(64), 
	root_run_id VARCHAR(64), 
	project VARCHAR(200), 
	task_type VARCHAR(64), 
	attempt INTEGER, 
	route_reason VARCHAR, 
	tags JSON NOT NULL, 
	metadata JSON NOT NULL, 
	prompt_hash VARCHAR(64), 
	prompt_preview VARCHAR, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_budgetkit_usage_created_at ON budgetkit_usage (created_at);

CREATE INDEX ix_budgetkit_usage_model_time ON budgetkit_usage (model, created_at);

CREATE INDEX ix_budgetkit_usage_operation_time ON budgetkit_usage (operation_type, created_at);

CREATE INDEX ix_budgetkit_usage_project_time ON budgetkit_usage (project, created_at);

CREATE INDEX ix_budgetkit_usage_prompt_hash ON budgetkit_usage (prompt_hash);

CREATE INDEX ix_budgetkit_usage_request_id ON budgetkit_usage (request_id);

CREATE INDEX ix_budgetkit_usage_root_run_id ON budgetkit_usage (root_run_id);

CREATE INDEX ix_budgetkit_usage_run_id ON budgetkit_usage (run_id);

CREATE INDEX ix_budgetkit_usage_session_time ON budgetkit_usage (session_id, created_at);

CREATE INDEX ix_budgetkit_usage_status ON budgetkit_usage (status);

CREATE INDEX ix_budgetkit_usage_user_time ON budgetkit_usage (user_id, created_at);

CREATE TABLE budgetkit_usage_daily (
	bucket DATETIME NOT NULL, 
	dims_key VARCHAR(32) NOT NULL, 
	model VARCHAR(200), 
	provider VARCHAR(64), 
	operation_type VARCHAR(64), 
	project VARCHAR(200), 
	status VARCHAR(16), 
	task_type VARCHAR(64), 
	calls BIGINT NOT NULL, 
	input_tokens BIGINT NOT NULL, 
	output_tokens BIGINT NOT NULL, 
	cached_input_tokens BIGINT NOT NULL, 
	cache_write_tokens BIGINT NOT NULL, 
	reasoning_tokens BIGINT NOT NULL, 
	total_tokens BIGINT NOT NULL, 
	cost_nanos BIGINT NOT NULL, 
	saved_nanos BIGINT NOT NULL, 
	latency_n BIGINT NOT NULL, 
	latency_sum FLOAT NOT NULL, 
	PRIMARY KEY (bucket, dims_key)
)
 WITHOUT ROWID;

CREATE TABLE budgetkit_usage_daily_tag (
	bucket DATETIME NOT NULL, 
	dims_key VARCHAR(32) NOT NULL, 
	tag VARCHAR(200), 
	status VARCHAR(16), 
	calls BIGINT NOT NULL, 
	input_tokens BIGINT NOT NULL, 
	output_tokens BIGINT NOT NULL, 
	cached_input_tokens BIGINT NOT NULL, 
	cache_write_tokens BIGINT NOT NULL, 
	reasoning_tokens BIGINT NOT NULL, 
	total_tokens BIGINT NOT NULL, 
	cost_nanos BIGINT NOT NULL, 
	saved_nanos BIGINT NOT NULL, 
	latency_n BIGINT NOT NULL, 
	latency_sum FLOAT NOT NULL, 
	PRIMARY KEY (bucket, dims_key)
)
 WITHOUT ROWID;

CREATE TABLE budgetkit_usage_daily_user (
	bucket DATETIME NOT NULL, 
	dims_key VARCHAR(32) NOT NULL, 
	user_id VARCHAR(200), 
	status VARCHAR(16), 
	calls BIGINT NOT NULL, 
	input_tokens BIGINT NOT NULL, 
	output_tokens BIGINT NOT NULL, 
	cached_input_tokens BIGINT NOT NULL, 
	cache_write_tokens BIGINT NOT NULL, 
	reasoning_tokens BIGINT NOT NULL, 
	total_tokens BIGINT NOT NULL, 
	cost_nanos BIGINT NOT NULL, 
	saved_nanos BIGINT NOT NULL, 
	latency_n BIGINT NOT NULL, 
	latency_sum FLOAT NOT NULL, 
	PRIMARY KEY (bucket, dims_key)
)
 WITHOUT ROWID;

CREATE TABLE budgetkit_usage_hourly (
	bucket DATETIME NOT NULL, 
	dims_key VARCHAR(32) NOT NULL, 
	model VARCHAR(200), 
	provider VARCHAR(64), 
	operation_type VARCHAR(64), 
	project VARCHAR(200), 
	status VARCHAR(16), 
	task_type VARCHAR(64), 
	calls BIGINT NOT NULL, 
	input_tokens BIGINT NOT NULL, 
	output_tokens BIGINT NOT NULL, 
	cached_input_tokens BIGINT NOT NULL, 
	cache_write_tokens BIGINT NOT NULL, 
	reasoning_tokens BIGINT NOT NULL, 
	total_tokens BIGINT NOT NULL, 
	cost_nanos BIGINT NOT NULL, 
	saved_nanos BIGINT NOT NULL, 
	latency_n BIGINT NOT NULL, 
	latency_sum FLOAT NOT NULL, 
	PRIMARY KEY (bucket, dims_key)
)
 WITHOUT ROWID;

CREATE TABLE budgetkit_usage_tag (
	usage_id VARCHAR(32) NOT NULL, 
	tag VARCHAR(200) NOT NULL, 
	PRIMARY KEY (usage_id, tag)
);

CREATE INDEX ix_budgetkit_usage_tag_tag ON budgetkit_usage_tag (tag, usage_id);
