-- ratelimit-policyd: MySQL/MariaDB schema.
--
-- The table is the Perl ratelimit-policyd's `ratelimit` table, unchanged, so
-- a database that the Perl daemon used works as it is. Load it into the
-- database named in database.url:
--
--   mysql -e "CREATE DATABASE IF NOT EXISTS policyd CHARACTER SET utf8"
--   mysql policyd < schema.sql
--   mysql -e "CREATE USER IF NOT EXISTS 'policyd'@'localhost' IDENTIFIED BY 'secret';
--             GRANT SELECT, INSERT, UPDATE, DELETE ON policyd.* TO 'policyd'@'localhost'"
--
-- Upgrading from the Perl daemon: only the index at the end is new. On an
-- existing table run just that statement (see README, "Migrating").

CREATE TABLE IF NOT EXISTS `ratelimit` (
  `id`      INT(11) NOT NULL AUTO_INCREMENT,
  `sender`  VARCHAR(255) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL COMMENT 'key: SASL username (or its domain)',
  `persist` TINYINT(1) NOT NULL DEFAULT '0' COMMENT '1: keep quota when the window resets',
  `quota`   INT(10) UNSIGNED NOT NULL DEFAULT '0' COMMENT 'units allowed per window',
  `used`    INT(10) UNSIGNED NOT NULL DEFAULT '0' COMMENT 'units used in the window ending at expiry',
  `updated` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP COMMENT 'last change',
  `expiry`  INT(10) UNSIGNED DEFAULT '0' COMMENT 'end of the window, unix seconds',
  PRIMARY KEY (`id`),
  UNIQUE KEY `idx_sender` (`sender`)
) ENGINE = InnoDB DEFAULT CHARSET = utf8;

-- Expiry as a date, for people reading the table.
CREATE OR REPLACE VIEW `view_ratelimit` AS
  SELECT `id`, `sender`, `persist`, `quota`, `used`, `updated`,
         FROM_UNIXTIME(`expiry`) AS `expiry`
  FROM `ratelimit`;

-- Added by ratelimit-policyd: the refresh reads rows changed since its last
-- run by `updated`.
CREATE INDEX `idx_updated` ON `ratelimit` (`updated`);
