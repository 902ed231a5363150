/*
 * parity-init: process 1 of every parity-sandbox container.
 *
 *   /.parity/init
 *
 * 1. Waits on stdin for the host, which writes once the container runs and the task's input
 *    files are in place: a 32-byte secret, then the task's command as a 4-byte big-endian
 *    length and that many bytes of entries, each a tag byte and a NUL-terminated string:
 *    'a' one argv element, 'e' one NAME=VALUE, 'o' one OUTPUT path under /work, 'w' the
 *    working directory. The rest of stdin is the task's. Since the task comes this late, a
 *    container can be started ahead of demand (a warm pool) and still serve exactly one task.
 * 2. Makes the parent folders of each OUTPUT (and out, the default one) in /work, then runs
 *    the command as its child and reaps every zombie of the container while it runs.
 * 3. When the command exits, kills every other process of the container (orphans included:
 *    kill(-1) from process 1 reaches the whole PID namespace), then writes the secret and the
 *    command's status (one byte: the exit code, or 128 + the signal) to stdout. The attach
 *    stream does not end when a process closes its output, so this trailer is how the host
 *    learns that the task and all it started are gone; no task process can forge it, as none
 *    knows the secret. Then a byte says whether any OUTPUT exists (an empty folder is none),
 *    and two bytes whether the command could not be started at all ('w': its working
 *    directory, 'x': the exec) and the errno, so that the host can tell "never started" from
 *    a command that exits 126 or 127.
 * 4. Closes its streams and waits for SIGUSR1, keeping the container alive while the host
 *    reads its cgroup's usage (gone with the container: a quick task would otherwise lose it)
 *    and copies the outputs out of its tmpfs workspace; then exits with the command's status:
 *    a container that exits by itself is removed much faster than one that has to be killed.
 *
 * Process 1 of a PID namespace gets no signal it has no handler for, so the task cannot kill it;
 * it is also made non-dumpable so that a task running as the same user cannot read its memory.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define SECRET_BYTES 32
#define MAX_COMMAND (8 << 20)

static void ignore(int sig) { (void)sig; }

static int status_code(int status) {
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return 255;
}

static int write_all(int fd, const unsigned char *data, size_t size) {
    while (size > 0) {
        ssize_t done = write(fd, data, size);
        if (done < 0 && errno == EINTR) continue;
        if (done <= 0) return -1;
        data += done;
        size -= (size_t)done;
    }
    return 0;
}

/* Whether a directory holds anything (an empty one, as made_output_dirs leaves it, is no
   output). */
static int has_entries(const char *path) {
    DIR *dir = opendir(path);
    if (!dir) return 1; /* unreadable: let the collection look */
    struct dirent *entry;
    int found = 0;
    while (!found && (entry = readdir(dir)) != NULL)
        found = strcmp(entry->d_name, ".") != 0 && strcmp(entry->d_name, "..") != 0;
    closedir(dir);
    return found;
}

static int any_exists(char **outputs, int count) {
    char path[4200];
    struct stat info;
    for (int i = 0; i < count; i++) {
        if (snprintf(path, sizeof path, "/work/%s", outputs[i]) >= (int)sizeof path) continue;
        if (lstat(path, &info) != 0) continue;
        if (!S_ISDIR(info.st_mode) || has_entries(path)) return 1;
    }
    return 0;
}

/* Before the task starts: the parent folders of each output, and "out" itself (the default
   output, a folder), so that a program writes out/x or results/y.txt without making them
   first. Best effort: a folder that cannot be made is the task's to miss. */
static void make_output_dirs(char **outputs, int count) {
    char path[4200];
    for (int i = 0; i < count; i++) {
        int length = snprintf(path, sizeof path, "/work/%s", outputs[i]);
        if (length < 0 || length >= (int)sizeof path) continue;
        int whole = strcmp(outputs[i], "out") == 0;
        for (char *slash = path + 6; *slash; slash++) {
            if (*slash != '/') continue;
            *slash = 0;
            mkdir(path, 0755);
            *slash = '/';
        }
        if (whole) mkdir(path, 0755);
    }
}

static int read_all(unsigned char *into, size_t size) {
    size_t have = 0;
    while (have < size) {
        ssize_t got = read(0, into + have, size - have);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return -1;
        have += (size_t)got;
    }
    return 0;
}

struct command {
    char **argv, **env, **outputs;
    int output_count;
    const char *workdir;
};

/* Splits the host's entries into their lists; each list ends with NULL. */
static int parse_command(char *block, size_t size, struct command *command) {
    size_t entries = 0;
    for (size_t i = 0; i < size; i++) entries += block[i] == '\0';
    if (size == 0 || block[size - 1] != '\0') return -1;
    command->argv = calloc(entries + 1, sizeof(char *));
    command->env = calloc(entries + 1, sizeof(char *));
    command->outputs = calloc(entries + 1, sizeof(char *));
    if (!command->argv || !command->env || !command->outputs) return -1;
    int argc = 0, envc = 0;
    command->output_count = 0;
    command->workdir = NULL;
    for (size_t at = 0; at < size;) {
        char tag = block[at];
        char *text = block + at + 1;
        at += strlen(block + at) + 1;
        if (tag == 'a') command->argv[argc++] = text;
        else if (tag == 'e') command->env[envc++] = text;
        else if (tag == 'o') command->outputs[command->output_count++] = text;
        else if (tag == 'w') command->workdir = text;
        else return -1;
    }
    return argc > 0 ? 0 : -1;
}

int main(void) {
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);

    unsigned char trailer[SECRET_BYTES + 4];
    unsigned char length[4];
    if (read_all(trailer, SECRET_BYTES) < 0 || read_all(length, 4) < 0) {
        fputs("parity-init: stdin ended before the host's secret and command\n", stderr);
        return 127;
    }
    size_t size = (size_t)length[0] << 24 | (size_t)length[1] << 16 | (size_t)length[2] << 8 |
                  (size_t)length[3];
    char *block = size <= MAX_COMMAND ? malloc(size + 1) : NULL;
    struct command command;
    if (!block || read_all((unsigned char *)block, size) < 0 ||
        parse_command(block, size, &command) < 0) {
        fputs("parity-init: the host's command is malformed\n", stderr);
        return 127;
    }

    sigset_t handled, previous;
    sigemptyset(&handled);
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = ignore;
    const int signals[] = {SIGCHLD, SIGUSR1};
    for (size_t i = 0; i < sizeof signals / sizeof signals[0]; i++) {
        sigaction(signals[i], &action, NULL);
        sigaddset(&handled, signals[i]);
    }
    sigprocmask(SIG_BLOCK, &handled, &previous);

    /* The child reports a failure to start on this pipe; a successful exec closes it. */
    int launch[2];
    if (pipe2(launch, O_CLOEXEC) < 0) {
        dprintf(2, "parity-init: cannot start the task: %s\n", strerror(errno));
        return 127;
    }
    unsigned char failure[2] = {0, 0};
    int code = 126;
    make_output_dirs(command.outputs, command.output_count);
    pid_t child = fork();
    if (child == 0) {
        close(launch[0]);
        memset(trailer, 0, sizeof trailer);
        setpgid(0, 0); /* the task's own group: kill(0, ...) in the task cannot reach us */
        action.sa_handler = SIG_DFL;
        for (size_t i = 0; i < sizeof signals / sizeof signals[0]; i++)
            sigaction(signals[i], &action, NULL);
        sigprocmask(SIG_SETMASK, &previous, NULL);
        for (char **entry = command.env; *entry; entry++) putenv(*entry);
        if (command.workdir && chdir(command.workdir) < 0) {
            unsigned char why[2] = {'w', (unsigned char)errno};
            dprintf(2, "parity-init: cannot enter %s: %s\n", command.workdir, strerror(errno));
            write_all(launch[1], why, sizeof why);
            _exit(126);
        }
        execvp(command.argv[0], command.argv);
        int error = errno;
        unsigned char why[2] = {'x', (unsigned char)error};
        dprintf(2, "parity-init: cannot run %s: %s\n", command.argv[0], strerror(error));
        write_all(launch[1], why, sizeof why);
        _exit(error == ENOENT ? 127 : 126);
    }
    close(launch[1]);
    if (child < 0) {
        failure[0] = 'f';
        failure[1] = (unsigned char)errno;
        dprintf(2, "parity-init: cannot start the task: %s\n", strerror(errno));
    } else {
        /* End of file (the exec happened) or the child's two bytes; signals are blocked. */
        size_t have = 0;
        while (have < sizeof failure) {
            ssize_t got = read(launch[0], failure + have, sizeof failure - have);
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) break;
            have += (size_t)got;
        }
        close(launch[0]);
        if (have < sizeof failure) failure[0] = failure[1] = 0;
        for (int done = 0; !done;) {
            if (sigwaitinfo(&handled, NULL) != SIGCHLD) continue;
            int status;
            pid_t pid;
            while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
                if (pid == child) {
                    code = status_code(status);
                    done = 1;
                }
            }
        }
    }
    kill(-1, SIGKILL);
    while (waitpid(-1, NULL, 0) > 0 || errno == EINTR) {}
    int keep = any_exists(command.outputs, command.output_count);
    trailer[SECRET_BYTES] = (unsigned char)code;
    trailer[SECRET_BYTES + 1] = (unsigned char)keep;
    trailer[SECRET_BYTES + 2] = failure[0];
    trailer[SECRET_BYTES + 3] = failure[1];
    write_all(1, trailer, sizeof trailer);
    write_all(2, trailer, sizeof trailer);
    close(0);
    close(1);
    close(2);
    while (sigwaitinfo(&handled, NULL) != SIGUSR1) {}
    return code;
}
