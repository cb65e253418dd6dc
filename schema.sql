-- ratelimit-policyd: MySQL/MariaDB schema for a new database. Safe to run
-- again: it creates only what is missing.
--
--   mysql -e "CREATE DATABASE IF NOT EXISTS policyd CHARACTER SET utf8"
--   mysql policyd < schema.sql
--
-- A database the Perl ratelimit-policyd already uses: run
-- schema-migrate.sql instead (README, "Migrating from the Perl daemon").
--
-- `ratelimit` is the Perl daemon's table, column for column; two things are
-- ours: `updated` follows every change of a row (ON UPDATE), so an edit made
-- by hand reaches the daemon at its next refresh, and an index on it makes
-- that refresh cheap.

CREATE TABLE IF NOT EXISTS `ratelimit` (
  `id`      INT(11) NOT NULL AUTO_INCREMENT,
  `sender`  VARCHAR(255) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL COMMENT 'key: SASL username (or its domain)',
  `persist` TINYINT(1) NOT NULL DEFAULT '0' COMMENT '1: keep quota when the window resets',
  `quota`   INT(10) UNSIGNED NOT NULL DEFAULT '0' COMMENT 'units allowed per window',
  `used`    INT(10) UNSIGNED NOT NULL DEFAULT '0' COMMENT 'units used in the window ending at expiry',
  `updated` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP COMMENT 'last change, by the daemon or by hand',
  `expiry`  INT(10) UNSIGNED DEFAULT '0' COMMENT 'end of the window, unix seconds',
  PRIMARY KEY (`id`),
  UNIQUE KEY `idx_sender` (`sender`),
  KEY `idx_updated` (`updated`)
) ENGINE = InnoDB DEFAULT CHARSET = utf8;

-- Each flush records its batch id here in the same transaction, so a flush
-- whose outcome was unknown (connection lost during COMMIT) is never applied
-- twice when it is sent again. Ids older than a week are removed.
CREATE TABLE IF NOT EXISTS `ratelimit_batches` (
  `daemon`  BIGINT UNSIGNED NOT NULL,
  `seq`     BIGINT UNSIGNED NOT NULL,
  `applied` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
  PRIMARY KEY (`daemon`, `seq`),
  KEY `idx_applied` (`applied`)
) ENGINE = InnoDB;

-- The Perl daemon's view: every column, plus the expiry as a date.
CREATE OR REPLACE VIEW `view_ratelimit` AS
  SELECT `id`, `sender`, `persist`, `quota`, `used`, `updated`, `expiry`,
         FROM_UNIXTIME(`expiry`) AS `expirytime`
  FROM `ratelimit`;
